"""Attention backends: where the KV cache lives and where attention over it is computed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # this package's __init__ stays light: disk workers import its submodules
    import torch

    from kvoffload.config import EngineConfig, ModelConfig


def make_backend(cfg: ModelConfig, config: EngineConfig, device: torch.device, dtype: str):
    """Contiguous in-memory KV (:class:`DenseBackend`) unless a KV budget or offload directory
    is configured, then the tiered store (:class:`TieredBackend`); either is handed the sparse
    policy, if one is configured."""
    import torch

    from kvoffload.model.loading import DTYPE
    from kvoffload.sparse import make_policy

    kv_dtype, act_dtype = DTYPE[config.kv_dtype or dtype], DTYPE[dtype]
    policy = make_policy(config.sparse, cfg, config.kv.block_size, device)
    if config.kv.tiered:
        from kvoffload.attention.tiered import TieredBackend

        return TieredBackend(cfg, config.kv, device, kv_dtype, act_dtype, torch.get_num_threads(), policy=policy)
    from kvoffload.attention.dense import DenseBackend

    return DenseBackend(cfg, device, kv_dtype, act_dtype, policy=policy, block_size=config.kv.block_size)
