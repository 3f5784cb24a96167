"""Benchmark scripts and the model benchmarks (run from the repository root: `python -m benchmarks.models`, ...).
Not part of the installed package."""
