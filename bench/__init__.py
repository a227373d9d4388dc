"""Benchmarks: ``make bench`` (``python -m bench``) runs relay's workloads and the peer's."""
