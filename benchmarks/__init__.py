"""Benchmarks of the macrl package (run them as scripts, e.g. ``python benchmarks/speed.py``)."""
