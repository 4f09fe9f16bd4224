"""Benchmarks of asymstore against baselines measured in the same run; run as ``python -m benchmarks.NAME``."""
