"""Device-side model: pure functions and Flax NNX modules, no I/O."""
