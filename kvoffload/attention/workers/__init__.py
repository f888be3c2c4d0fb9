"""Attention workers: each owns the blocks of one tier (or disk shard) and attends near them.

protocol.py: what goes in and out (transport-independent). local.py: in-process workers over
memory tiers. process.py: disk workers, separate processes over their shard files.
"""
