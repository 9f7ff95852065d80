"""Benchmarks, each printing its figures next to a named baseline measured in the same run.

Run them as modules from the repository root, e.g. `.venv/bin/python -m bench.queue --help`.
"""
