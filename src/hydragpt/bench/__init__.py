"""Benchmarks: measured side by side (alternated runs) in one process, never in timed unit tests."""
