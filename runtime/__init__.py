"""Plumbing shared by every trainbus process: settings, bus connection, embedded nats-server,
logging, the event publisher and the ``trainbus`` CLI."""
