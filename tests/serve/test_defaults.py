"""Per-checkpoint sampling defaults (generation_config.json) and how a request overrides them."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("fastapi")

from kvoffload.model.generation import checkpoint_sampling_defaults
from kvoffload.serve.app import SERVER_DEFAULTS
from kvoffload.serve.protocol import (
    ChatRequest,
    CompletionRequest,
    RequestError,
    sampling_params,
)


def test_hf_generation_config_defaults(tmp_path):
    assert checkpoint_sampling_defaults(str(tmp_path)) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"temperature": 0.6, "top_p": 0.9, "top_k": 20, "repetition_penalty": 1.1, "do_sample": True, "bos_token_id": 1}))
    assert checkpoint_sampling_defaults(str(tmp_path)) == {"temperature": 0.6, "top_p": 0.9, "top_k": 20,
                                                           "repeat_penalty": 1.1}
    (tmp_path / "generation_config.json").write_text(json.dumps({"temperature": 0.6, "do_sample": False}))
    assert checkpoint_sampling_defaults(str(tmp_path))["temperature"] == 0.0        # greedy
    (tmp_path / "generation_config.json").write_text("[not json")
    assert checkpoint_sampling_defaults(str(tmp_path)) == {}


def test_request_fields_override_checkpoint_defaults_which_override_openai_defaults():
    defaults = {**SERVER_DEFAULTS, "temperature": 0.6, "top_k": 20, "repeat_penalty": 1.1}
    req = CompletionRequest(prompt="x")
    p = sampling_params(req, defaults, 16, None, None)
    assert (p.temperature, p.top_p, p.top_k, p.repeat_penalty) == (0.6, 1.0, 20, 1.1)
    req = ChatRequest(messages=[{"role": "user", "content": "x"}], temperature=0, top_k=-1, repetition_penalty=1.0,
                      presence_penalty=0.5, seed=3)
    p = sampling_params(req, defaults, 16, None, None, seed_offset=2)
    assert p.greedy and p.top_k == 0 and p.repeat_penalty == 1.0 and p.presence_penalty == 0.5 and p.seed == 5
    with pytest.raises(RequestError) as e:
        sampling_params(CompletionRequest(prompt="x", repeat_penalty=float("inf")), defaults, 16, None, None)
    assert e.value.status == 400 and e.value.param == "repeat_penalty"
