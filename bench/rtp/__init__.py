"""Helpers for bench/bench_rtp.py: C sources (compiled at run time), relay peers, ng client."""
