"""Efficiency benchmarks: operator and model speed, memory, parameter and MAC counts."""
