"""``python -m runtime.cli``: the ``trainbus`` command, for subprocesses that must run this interpreter."""

import sys

from runtime.cli.main import main

sys.exit(main())
