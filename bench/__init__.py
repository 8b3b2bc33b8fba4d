"""Benchmarks: each module is ``python -m bench.<name>``; shared helpers in ``bench.common``."""
