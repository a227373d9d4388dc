"""Running relay: the embedded Redis and the ``make run`` launcher."""
