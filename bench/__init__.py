"""Benchmarks for tensorgate: model generation (``python -m bench.models``) and load drivers."""
