"""Peer benchmark harness (``python -m benchmarks.peers``); see ``run.py``."""
