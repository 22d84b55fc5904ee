"""Benchmarks: measured side by side in one run, as the SPEC asks, never in timed unit tests."""
