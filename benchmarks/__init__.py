"""The benchmarks behind `trainbus bench NAME`: each module registers its subcommand through the
``trainbus.benchmarks`` entry-point group and prints figures measured side by side in one run.

They measure the product; nothing in the product packages imports them. Shared helpers are in
``benchmarks.common``.
"""
