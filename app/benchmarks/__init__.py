"""Benchmarks behind ``cellfuse bench ...``: each prints its numbers and returns them as a dict."""
