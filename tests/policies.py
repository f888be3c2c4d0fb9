"""The sparse-policy cases every prefix-reuse test runs over (the persistent store's and prefix
sharing's): each registered policy at a quarter budget, and the self-speculative draft."""

from __future__ import annotations

import json
import random

from kvoffload.sparse.registry import POLICIES

POLICY_CASES = [*({"sparse_policy": p, "sparse_budget": "1/4"} for p in POLICIES),
                {"speculate": "self", "spec_draft_budget": 16}]
POLICY_IDS = [*POLICIES, "speculate-self"]


def with_calibration(extra: dict, hf_config, tmp_path) -> dict:
    """``extra`` with a random channel file for ``double_sparsity`` (which needs one), written in
    ``tmp_path`` for a tiny model of ``hf_config``."""
    if extra.get("sparse_policy") != "double_sparsity":
        return extra
    D = hf_config.hidden_size // hf_config.num_attention_heads
    rng = random.Random(0)
    calib = tmp_path / "channels.json"
    calib.write_text(json.dumps({"format": "kvoffload-channels/1", "channels": [
        [rng.sample(range(D), D) for _ in range(hf_config.num_key_value_heads)]
        for _ in range(hf_config.num_hidden_layers)]}))
    return {**extra, "sparse_calibration": str(calib)}
