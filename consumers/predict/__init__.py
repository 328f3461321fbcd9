"""The predictor: audit-approved checkpoints served on the bus, the predict client, merged export.

``trainbus serve --run R`` loads the run's ``best`` checkpoint (the audit gate's pointer in the
``TRAINBUS_CHECKPOINTS`` bucket) with the trainer's own model and scoring code, answers on
``trainbus.predict.<alias>`` as a ``nats.micro`` service, micro-batches concurrent requests and
hot-swaps when the pointer moves. ``trainbus predict`` and ``consumers.predict.client`` call it;
``trainbus export`` writes the same model merged, for plain transformers.
"""
