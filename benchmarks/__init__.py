"""Baseline apps for ``blackroad bench`` (run as separate processes)."""
