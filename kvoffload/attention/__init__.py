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
    the sparse policy, if one is configured. A compressed KV (``--kv-dtype int8/int4``) is always
    the tiered store (its blocks compressed, its tails in the compute dtype): with no tier
    configured, one unlimited tier in the compute device's memory."""
    import dataclasses

    import torch

    from kvoffload.dtypes import QUANT, torch_dtype
    from kvoffload.sparse import make_policy

    stored = config.kv_dtype or dtype
    quant = stored in QUANT
    kv_dtype, act_dtype = torch_dtype(dtype if quant else stored), torch_dtype(dtype)
    policy = make_policy(config.sparse, cfg, config.kv.block_size, device)
    threads = torch.get_num_threads()
    if config.kv.tiered or quant:
        from kvoffload.attention.tiered import TieredBackend

        kv = config.kv
        if not kv.tiered:
            kv = dataclasses.replace(kv, kv_tiers=(("device" if device.type == "cuda" else "host", None),))
        return TieredBackend(cfg, kv, device, kv_dtype, act_dtype, threads, policy=policy, stored=stored)
    from kvoffload.attention.dense import DenseBackend

    return DenseBackend(cfg, device, kv_dtype, act_dtype, policy=policy, block_size=config.kv.block_size,
                        chunk_blocks=config.kv.chunk_blocks, threads=threads)
