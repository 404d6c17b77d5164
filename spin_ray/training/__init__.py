"""Main-player training: the Ray-free step function and (later) the Ray Train worker loop."""
