"""Benchmarks, side by side with peers (see bench/README.md)."""
