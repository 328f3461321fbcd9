"""The bus: finding and connecting to NATS (``connect``), the embedded nats-server and a local
cluster (``server``, ``cluster``), the ``TRAINBUS_EVENTS`` stream and its readers (``stream``), and
the loop every consumer shares (``consume``)."""
