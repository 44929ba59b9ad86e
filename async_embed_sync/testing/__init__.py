"""Simulated clusters for the demo, the tests and the benchmarks; only demo.py imports it."""
