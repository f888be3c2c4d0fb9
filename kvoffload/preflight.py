"""Checks that need no model weights, run before the (10-20 s) model load so that a wrong flag
fails at once: the sparse policies' names, the KV tiers' names, the offload directory, Ray and
the Ray cluster's address, the KV block format (a compressed KV's group size against the
model's head dimension), each tier's budget against one KV chunk (from the checkpoint's header
only), and the KV store directory."""

from __future__ import annotations

from kvoffload.config import EngineConfig


def preflight(config: EngineConfig, device_type: str, dtype: str) -> None:
    """Raise the one-line error the engine would raise after loading (``dtype``: the compute
    dtype in use, ``auto`` resolved)."""
    from kvoffload.dtypes import QUANT
    from kvoffload.kv.layout import BlockLayout
    from kvoffload.kv.tiers.disk import check_offload_base
    from kvoffload.kv.tiers.protocol import TierSpec, chunk_capacity
    from kvoffload.kv.tiers.ray import check_ray
    from kvoffload.kv.tiers.registry import tier_class
    from kvoffload.model.loading import read_config
    from kvoffload.model.registry import resolve_model
    from kvoffload.sparse import policy_class

    if config.sparse.enabled:
        policy_class(config.sparse.sparse_policy)
    if config.spec.enabled and config.spec.spec_draft_policy != "dense":
        policy_class(config.spec.spec_draft_policy)
    if config.store.enabled:                  # created (0700) if absent; a one-line error if unusable
        from kvoffload.kv.persist.store import BlockDir

        BlockDir(config.store.kv_store, config.store.kv_store_budget, config.store.kv_store_fsync)
    kv = config.kv
    stored = config.kv_dtype or dtype
    if not kv.tiered and stored not in QUANT:
        return
    tiers = kv.tier_list(device_type) if kv.tiered else ()
    for name, budget in tiers:
        tier_class(name)
        if name == "disk" and budget != 0:
            check_offload_base(kv.offload_dir)
        if name == "ray" and budget != 0:
            check_ray(kv.ray_address, kv.ray_timeout)
    cfg = read_config(resolve_model(config.model, config.cache_dir))        # the header only
    lay = BlockLayout.for_kv(kv, cfg.num_kv_heads, cfg.head_dim, stored)    # a bad format: its one-line error
    for name, budget in tiers:
        chunk_capacity(TierSpec(name, budget), tier_class(name).chunk_bytes(lay))


def preflight_chat_template(config: EngineConfig) -> None:
    """The model's chat template parses (read from the GGUF header or the HF directory; the
    weights are not read). A template that fails only when rendered is reported at render time."""
    import os
    from pathlib import Path

    from kvoffload.model.loader.gguf_file import GGUFFile
    from kvoffload.model.registry import resolve_model
    from kvoffload.model.tokenizer import (
        FALLBACK_CHAT_TEMPLATE,
        TokenizerError,
        _hf_chat_template,
        _jinja_env,
        _read_json,
    )

    path = resolve_model(config.model, config.cache_dir)
    if os.path.isdir(path):
        template = _hf_chat_template(Path(path), _read_json(Path(path) / "tokenizer_config.json", missing_ok=True))
    else:
        template = GGUFFile(path).metadata.get("tokenizer.chat_template")
    import jinja2

    try:
        _jinja_env().from_string(str(template) if template is not None else FALLBACK_CHAT_TEMPLATE)
    except jinja2.TemplateSyntaxError as exc:
        raise TokenizerError(f"chat template does not parse: {exc}") from None
