"""The Prometheus exporter consumer: ``state`` (pure event folding), ``collector`` (metric families
on each scrape), ``cli`` (`trainbus exporter`: the bus loop and the HTTP server) and ``bench``
(`trainbus bench exporter`: publish-to-/metrics freshness)."""
