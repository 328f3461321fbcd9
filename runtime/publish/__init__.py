"""Publishing events: the one path every event of a training run takes to JetStream.

A training process publishes through its publisher process: ``sink.PublisherSink`` appends each
event to the run's outbox journal (``journal``, ``outbox``) and wakes the publisher process
(``process``), which owns the NATS connection and sends with ``sender.Sender`` (pipelined
batches, acks and refusals in ``delivery``, trimming in ``oversize``). Replaying an outbox
(`trainbus outbox flush`) and every benchmark use the same sender. ``sinks`` holds the
``EventSink`` protocol, the ``Stamper`` that numbers events, and the offline sinks.
"""
