"""Tiers, fastest first: memory.py (device memory or host RAM) and disk.py (files)."""
