"""Engine core: request queue, scheduling, admission and the worker that drives a runner."""
