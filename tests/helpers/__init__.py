"""Helpers shared by tests and benchmarks (benchmarks put tests/ on sys.path to import them)."""
