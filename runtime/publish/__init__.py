"""Publishing events: the one path every event of a training run takes to JetStream.

A training process publishes through its publisher process: ``sink.PublisherSink`` appends each
event to the run's outbox journal (``journal``, ``outbox``) and wakes the publisher process
(``process``) for what goes at once, which owns the NATS connection and sends with
``sender.Sender``: what may wait is gathered within a short window (``window``), then sent as one
pipelined batch (acks and refusals in ``delivery``, trimming in ``oversize``). Replaying an outbox
(`trainbus outbox flush`, ``replay``) and every benchmark use the same sender. Consumers that publish
an event of their own use ``direct``, the one helper for its subject and de-duplication id.
``sinks`` holds the ``EventSink`` protocol, the ``Stamper`` that numbers events, and the offline sinks.
"""
