"""Sparse decode attention: policies that choose which KV blocks each decode step reads.

``make_policy(config, model, block_size, device)`` returns the configured policy, or ``None``
for dense attention. See :mod:`kvoffload.sparse.base` for the seam.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from kvoffload.config import ModelConfig, SparseConfig
    from kvoffload.sparse.base import SparsePolicy


def policy_class(name: str) -> type[SparsePolicy]:
    """The registered policy called ``name`` (a one-line ConfigError otherwise)."""
    from kvoffload.errors import ConfigError
    from kvoffload.sparse.registry import POLICIES

    if name not in POLICIES:
        raise ConfigError(f"unknown sparse policy {name!r} (choose from dense, {', '.join(POLICIES)})")
    return POLICIES[name]


def make_policy(cfg: SparseConfig, model: ModelConfig, block_size: int, device: torch.device) -> SparsePolicy | None:
    if not cfg.enabled:
        return None
    return policy_class(cfg.sparse_policy)(cfg, model, block_size, device)
