"""Evaluation: the task registry, grading, budget sweeps, s1 metrics and plots (`t0s1 eval`, `t0s1 grade`)."""
