"""The ``trainbus`` command line: ``main`` builds the parser from the ``trainbus.commands``
entry-point group; each module here registers one bus-level command (``up``/``nats``, ``status``,
``outbox``, ``events``, ``runs``, ``tag``/``note``, ``schema``, ``bench``, ``demo``); ``args`` and
``render`` are what the commands share."""
