"""The launch queue, a layer over the bus and the one-event publish path: job records changed by
compare-and-set, each change a ``job.state`` event (``jobs``); the work-queue stream, its consumers,
the agents' heartbeats, queueing and cancelling (``queue``)."""
