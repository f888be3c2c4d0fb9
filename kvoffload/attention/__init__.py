"""Attention backends: where the KV cache lives and where attention over it is computed."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:      # this package's __init__ stays light
    import torch

    from kvoffload.attention.backend import KVManager
    from kvoffload.config import EngineConfig, ModelConfig


def make_backend(cfg: ModelConfig, config: EngineConfig, device: torch.device, dtype: str) -> KVManager:
    """Contiguous in-memory KV (:class:`DenseBackend`) unless KV tiers, a budget or an offload
    directory are configured, then the tiered store (:class:`TieredBackend`); either is handed
    the sparse policy, if one is configured."""
    import torch

    from kvoffload.dtypes import torch_dtype
    from kvoffload.sparse import make_policy

    kv_dtype, act_dtype = torch_dtype(config.kv_dtype or dtype), torch_dtype(dtype)
    policy = make_policy(config.sparse, cfg, config.kv.block_size, device)
    threads = torch.get_num_threads()
    if config.kv.tiered:
        from kvoffload.attention.tiered import TieredBackend

        return TieredBackend(cfg, config.kv, device, kv_dtype, act_dtype, threads, policy=policy)
    from kvoffload.attention.dense import DenseBackend

    return DenseBackend(cfg, device, kv_dtype, act_dtype, policy=policy, block_size=config.kv.block_size,
                        chunk_blocks=config.kv.chunk_blocks, threads=threads)
