"""Benchmarks: `make bench` (or `python -m bench`). Results go to docs/benchmarks.md."""
