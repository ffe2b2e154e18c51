"""Baseline apps for ``make bench`` (run as separate processes)."""
