"""Tiers, fastest first: memory.py (device memory or host RAM), disk.py (files), ray.py (actors
on other machines)."""
