"""GGUF checkpoints through the ``gguf`` package, dequantised to the compute dtype."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from kvoffload.config import ModelConfig, RopeScaling
from kvoffload.errors import ConfigError, ModelLoadError
from kvoffload.model.loader.common import (
    MISSING,
    LoadedCheckpoint,
    build_state_dict,
    check_arch,
    header_value,
)
from kvoffload.model.loader.gguf_file import GGUFFile

# GGUF per-layer tensor name -> Hugging Face name suffix
_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
# llama.cpp's converter permutes q/k rows for interleaved RoPE on these architectures.
_PERMUTED_ARCHS = ("llama", "mistral")


def _hf_name(gguf_name: str) -> str | None:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("blk."):
        _, idx, rest = gguf_name.split(".", 2)
        if rest in _LAYER_NAMES:
            return f"model.layers.{idx}.{_LAYER_NAMES[rest]}"
    return None


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (interleaved -> rotate-half RoPE)."""
    rows = w.shape[0]
    half = rows // n_head // 2
    return w.reshape(n_head, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def config_from_gguf(meta: dict[str, Any], freq_factors: np.ndarray | None, path: str) -> ModelConfig:
    arch = meta.get("general.architecture")
    if not isinstance(arch, str):
        raise ModelLoadError(f"{path}: GGUF has no general.architecture")
    check_arch(arch, path)

    def g(key: str, kind: type = int, default: Any = MISSING, minimum: float | None = 1) -> Any:
        return header_value(meta, f"{arch}.{key}", kind, path, default, minimum)

    heads = g("attention.head_count")
    hidden = g("embedding_length")
    tokens = meta.get("tokenizer.ggml.tokens")
    vocab = meta.get(f"{arch}.vocab_size") or (len(tokens) if isinstance(tokens, (list, tuple)) else 0)
    scaling = None
    scale_type = meta.get(f"{arch}.rope.scaling.type")
    if freq_factors is not None:
        scaling = RopeScaling("llama3", freq_factors=tuple(float(x) for x in freq_factors))
    elif scale_type == "linear":
        scaling = RopeScaling("linear", factor=g("rope.scaling.factor", float, minimum=1e-9))
    elif scale_type not in (None, "none"):
        raise ModelLoadError(f"{path}: unsupported rope scaling {scale_type!r:.40}")
    try:
        return ModelConfig(
            arch=arch,
            vocab_size=header_value({"vocab_size": vocab}, "vocab_size", int, path, minimum=1, name=f"{arch}.vocab_size"),
            hidden_size=hidden,
            intermediate_size=g("feed_forward_length"),
            num_layers=g("block_count"),
            num_heads=heads,
            num_kv_heads=g("attention.head_count_kv", default=heads),
            head_dim=g("attention.key_length", default=hidden // heads),
            rms_eps=g("attention.layer_norm_rms_epsilon", float, 1e-5, minimum=0),
            rope_theta=g("rope.freq_base", float, 10000.0, minimum=1e-9),
            rope_scaling=scaling,
            max_position=g("context_length", default=4096, minimum=2),
            tie_embeddings=False,          # decided from the tensors below
            qkv_bias=False,
        )
    except ConfigError as e:
        raise ModelLoadError(f"{path}: {e}") from None


def model_config(f: GGUFFile) -> ModelConfig:
    """The :class:`ModelConfig` of an opened GGUF (metadata plus what the tensors imply)."""
    freq_factors = f.dequantize("rope_freqs.weight").reshape(-1) if "rope_freqs.weight" in f.tensors else None
    cfg = config_from_gguf(f.metadata, freq_factors, f.path)
    return dataclasses.replace(cfg, tie_embeddings="output.weight" not in f.tensors,
                               qkv_bias="blk.0.attn_q.bias" in f.tensors)


def read_gguf_config(path: str) -> ModelConfig:
    return model_config(GGUFFile(path))


def load_gguf(path: str | GGUFFile, dtype: torch.dtype, quant: str = "none", max_rows: int = 8,
              q5: bool = False) -> LoadedCheckpoint:
    """Dense tensors in ``dtype`` (``quant`` ``none``), or the linear layers built straight
    in their decode format (``int4`` / ``int8``) one tensor at a time, with no dense copy of
    the model (see :func:`_quantized_modules`). ``q5``: under ``int8``, Q5_0 layers keep their
    own codes (:class:`~kvoffload.model.quant.Q5Linear`; only the native decode kernel reads them
    fast, so the caller says whether it runs)."""
    f = path if isinstance(path, GGUFFile) else GGUFFile(path)
    cfg = model_config(f)
    by_hf = {h: name for name in f.tensors if (h := _hf_name(name)) is not None}

    def get(hf: str) -> torch.Tensor | None:
        name = by_hf.get(hf)
        if name is None:
            return None
        w = torch.from_numpy(f.dequantize(name))
        if w.shape[0] == 1:                      # 1-D tensors (norms, biases)
            w = w.reshape(-1)
        if cfg.arch in _PERMUTED_ARCHS and (".q_proj." in hf or ".k_proj." in hf):
            w = _unpermute(w, cfg.num_heads if ".q_proj." in hf else cfg.num_kv_heads)
        return w

    if quant == "none":
        sd = build_state_dict(cfg, get, dtype, f.path)
        return LoadedCheckpoint(cfg, sd, f.metadata, f.path, "gguf", layer_weight_type(f))
    modules, mapped = _quantized_modules(f, cfg, quant, dtype, max_rows, q5)
    sd = {"norm.weight": get("model.norm.weight").to(dtype)}
    for i in range(cfg.num_layers):
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "input_norm.weight"] = get(p + "input_layernorm.weight").to(dtype)
        sd[o + "post_attn_norm.weight"] = get(p + "post_attention_layernorm.weight").to(dtype)
    return LoadedCheckpoint(cfg, sd, f.metadata, f.path, "gguf", layer_weight_type(f), modules, mapped)


INT8_CHUNK_ROWS = 4096           # rows converted to int8 at a time (bounds the transient and the map's resident pages)


def _rows_fp32(f: GGUFFile, name: str, r0: int, r1: int) -> torch.Tensor:
    from kvoffload.kernels.qweights import gguf_dequant

    info = f.tensors[name]
    return torch.from_numpy(gguf_dequant(f.raw(name)[r0:r1], info.qtype, info.rows_cols[1]))


def _permutation(cfg: ModelConfig, part: str) -> int | None:
    """Heads whose q/k rows llama.cpp permuted (undone here), or None."""
    if cfg.arch in _PERMUTED_ARCHS and part in ("attn_q", "attn_k"):
        return cfg.num_heads if part == "attn_q" else cfg.num_kv_heads
    return None


def _row_addresses(f: GGUFFile, name: str, perm: int | None) -> np.ndarray:
    """The address of each row of a tensor in the map, in our row order (llama.cpp's q/k
    permutation undone)."""
    raw = f.raw(name)
    idx = torch.arange(raw.shape[0])
    return raw.ctypes.data + raw.strides[0] * (idx if perm is None else _unpermute(idx, perm)).numpy()


def _int8_linear(f: GGUFFile, names: list[str], perms: list[int | None], bias: torch.Tensor | None,
                 dtype: torch.dtype, max_rows: int):
    from kvoffload.kernels.qweights import gguf_to_int8
    from kvoffload.model.quant import Int8Linear, int8_rows

    rows = [f.tensors[n].rows_cols[0] for n in names]
    K = f.tensors[names[0]].rows_cols[1]
    q, scale = torch.empty(sum(rows), K, dtype=torch.int8), torch.empty(sum(rows))              # [N, K], [N]
    at = 0
    for name, n, perm in zip(names, rows, perms):
        info, addr = f.tensors[name], _row_addresses(f, name, perm)
        for r0 in range(0, n, INT8_CHUNK_ROWS):
            r1 = min(n, r0 + INT8_CHUNK_ROWS)
            if not gguf_to_int8(info.qtype, addr[r0:r1], q[at + r0:at + r1], scale[at + r0:at + r1]):
                q[at + r0:at + r1], scale[at + r0:at + r1] = int8_rows(_rows_fp32(f, name, r0, r1))
                if perm is not None and r1 == n:  # per-row codes: permuting rows commutes with quantising
                    q[at:at + n], scale[at:at + n] = _unpermute(q[at:at + n], perm), _unpermute(scale[at:at + n], perm)
            if perm is None:                      # rows read in order: their pages can go now
                f.release(name, r0, r1)
        f.release(name)
        at += n
    return Int8Linear(q, scale, bias, dtype, max_rows)


def _q4_codes(f: GGUFFile, name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A Q4_0 / Q4_1 tensor's own codes, scales and zeros in :class:`Int4Linear`'s terms
    (w = (q - 8)·scale + zero): Q4_0 w = d·(q - 8), Q4_1 w = d·q + m = (q - 8)·d + (m + 8d)."""
    info = f.tensors[name]
    n, cols = info.rows_cols
    raw = torch.from_numpy(f.raw(name).copy()).view(n, cols // 32, -1)              # [n, blocks, bytes]
    d = raw[..., 0:2].contiguous().view(torch.float16).float().squeeze(-1)         # [n, blocks]
    qs = raw[..., -16:].to(torch.int32)                                             # [n, blocks, 16]
    q = torch.cat([qs & 0xF, qs >> 4], -1).view(n, cols)                            # element j, then j + 16
    if info.qtype == Q4_0:
        return q, d, torch.zeros_like(d)
    m = raw[..., 2:4].contiguous().view(torch.float16).float().squeeze(-1)
    return q, d, m + 8 * d


def _q4k_codes(raw: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Q4_K blocks ``[n, row bytes]`` (rows of 256-value super-blocks: fp16 d and dmin, twelve
    bytes of 6-bit sub-block scales and minima, 128 bytes of codes) -> codes 0..15 ``[n, cols]``
    int32, scale and zero ``[n, cols/32]`` fp32 in :class:`Int4Linear`'s terms: a sub-block of 32
    is one of its groups, w = d·sc·q − dmin·m = (q − 8)·scale + zero with scale = d·sc and
    zero = 8·d·sc − dmin·m. The codes are the file's."""
    n = raw.shape[0]
    b = np.ascontiguousarray(raw).reshape(n, -1, 144)                                # [n, supers, 144]
    d = b[..., 0:2].copy().view(np.float16).astype(np.float32)                       # [n, S, 1]
    dmin = b[..., 2:4].copy().view(np.float16).astype(np.float32)
    sb = b[..., 4:16]                                                                # [n, S, 12]
    lo, hi, top = sb[..., 0:4], sb[..., 4:8], sb[..., 8:12]
    sc = np.concatenate([lo & 0x3F, (top & 0x0F) | ((lo >> 2) & 0x30)], -1)          # [n, S, 8]
    mn = np.concatenate([hi & 0x3F, (top >> 4) | ((hi >> 2) & 0x30)], -1)
    qs = b[..., 16:].reshape(n, -1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, -1).astype(np.int32)                                  # sub-block 2j: low nibbles
    scale = (d * sc).reshape(n, -1)                                                  # [n, cols/32]
    zero = (8 * scale.reshape(n, -1, 8) - dmin * mn).reshape(n, -1)
    return torch.from_numpy(q), torch.from_numpy(scale), torch.from_numpy(zero)


def _int4_linear(f: GGUFFile, names: list[str], perms: list[int | None], bias: torch.Tensor | None,
                 dtype: torch.dtype, max_rows: int):
    from kvoffload.kernels.qweights import q4_pack
    from kvoffload.model.quant import Int4Linear, int4_codes

    qtypes = {f.tensors[n].qtype for n in names}
    if len(qtypes) == 1 and qtypes <= {Q4_0, Q4_1}:         # the file's codes as they are, natively
        rows = np.concatenate([_row_addresses(f, n, p) for n, p in zip(names, perms)])
        got = q4_pack(qtypes.pop(), rows, f.tensors[names[0]].rows_cols[1])
        if got is not None:
            for name in names:
                f.release(name)
            return Int4Linear(got[0], got[1].to(dtype), bias, dtype, max_rows)
    parts = []
    for name, perm in zip(names, perms):
        info = f.tensors[name]
        if info.qtype in (Q4_0, Q4_1):
            codes = _q4_codes(f, name)
        elif info.qtype == Q4_K:
            codes = _q4k_codes(f.raw(name))
        else:                                    # other types: min/max groups of the dequantised rows
            codes = int4_codes(_rows_fp32(f, name, 0, info.rows_cols[0]))
        if perm is not None:
            codes = tuple(_unpermute(c, perm) for c in codes)
        parts.append(codes)
        f.release(name)
    q, scale, zero = (torch.cat([p[i] for p in parts]) for i in range(3))
    return Int4Linear.from_codes(q, scale, zero, bias, dtype, max_rows)


def _q5_linear(f: GGUFFile, names: list[str], perms: list[int | None], bias: torch.Tensor | None,
               dtype: torch.dtype, max_rows: int):
    """Q5_0 tensors -> :class:`~kvoffload.model.quant.Q5Linear` with the file's codes and scales;
    int8 when the native packing is unavailable."""
    from kvoffload.kernels.qweights import q5_pack
    from kvoffload.model.quant import Q5Linear

    rows = np.concatenate([_row_addresses(f, n, p) for n, p in zip(names, perms)])
    got = q5_pack(rows, f.tensors[names[0]].rows_cols[1])
    if got is None:
        return _int8_linear(f, names, perms, bias, dtype, max_rows)
    for name in names:
        f.release(name)
    return Q5Linear(*got, bias, dtype, max_rows)


Q4_0, Q4_1, Q5_0, Q4_K = 2, 3, 6, 12  # ggml type ids
INT4_CODES = (Q4_0, Q4_1, Q4_K)   # types whose codes Int4Linear holds as they are (no re-quantising)


def _quantized_modules(f: GGUFFile, cfg: ModelConfig, quant: str, dtype: torch.dtype,
                       max_rows: int, q5: bool = False) -> tuple[dict[str, torch.nn.Module], int]:
    """Every linear layer built from its GGUF tensors one at a time (int8: a chunk of rows at
    a time), each tensor's pages released from RSS after use; the LM head per
    :data:`~kvoffload.model.quant.HEAD_METHOD`. The token embedding reads the file's own
    blocks on use (:class:`GGUFEmbedding`), or the int8 head when tied. Returns the modules and
    the bytes left in the map."""
    from kvoffload.model.quant import (
        HEAD_METHOD,
        INT4_GROUP,
        Q5_GROUP,
        Int4Linear,
        Int8Embedding,
        Q5Linear,
    )

    build = {"int4": _int4_linear, "int8": _int8_linear}
    if quant not in build:
        raise ConfigError(f"unknown quantization {quant!r}")

    def bias(i: int) -> torch.Tensor | None:
        if not cfg.qkv_bias:
            return None
        return torch.cat([torch.from_numpy(f.dequantize(f"blk.{i}.attn_{n}.bias")).reshape(-1) for n in "qkv"])

    def layer(names: list[str], perms: list[int | None], b: torch.Tensor | None) -> torch.nn.Module:
        """int8 keeps a layer the file holds in 4 bits as int4, its own codes (smaller, and no
        further from the file: Qwen2.5-Coder-0.5B's Q4_K ffn_down in half its layers), and with
        ``q5`` a Q5_0 layer as q5 (its own codes in 5.5 bits, not re-quantised to 8)."""
        infos = [f.tensors[n] for n in names]
        K, N = infos[0].rows_cols[1], sum(t.rows_cols[0] for t in infos)
        build_as = build[quant]
        if quant == "int8" and all(t.qtype in INT4_CODES for t in infos) and K % INT4_GROUP == 0 \
                and N % Int4Linear.slice_align == 0:
            build_as = _int4_linear
        elif quant == "int8" and q5 and all(t.qtype == Q5_0 for t in infos) and K % Q5_GROUP == 0 \
                and N % Q5Linear.slice_align == 0:
            build_as = _q5_linear
        return build_as(f, names, perms, b, dtype, max_rows)

    out: dict[str, torch.nn.Module] = {}
    for i in range(cfg.num_layers):
        b = f"blk.{i}."
        qkv = [b + f"attn_{n}.weight" for n in "qkv"]
        out[f"layers.{i}.attn.qkv_proj"] = layer(qkv, [_permutation(cfg, p) for p in ("attn_q", "attn_k", "attn_v")],
                                                 bias(i))
        out[f"layers.{i}.attn.o_proj"] = layer([b + "attn_output.weight"], [None], None)
        out[f"layers.{i}.mlp.gate_up_proj"] = layer([b + "ffn_gate.weight", b + "ffn_up.weight"], [None, None], None)
        out[f"layers.{i}.mlp.down_proj"] = layer([b + "ffn_down.weight"], [None], None)
    head_name = "token_embd.weight" if cfg.tie_embeddings else "output.weight"
    out["lm_head"] = build[HEAD_METHOD[quant]](f, [head_name], [None], None, dtype, max_rows)
    if cfg.tie_embeddings and HEAD_METHOD[quant] == "int8":
        out["embed"] = Int8Embedding(out["lm_head"])
        return out, 0
    out["embed"] = GGUFEmbedding(f, "token_embd.weight", dtype)
    return out, f.tensors["token_embd.weight"].nbytes


class GGUFEmbedding(torch.nn.Module):
    """Token embeddings looked up in the file's own blocks (memory-mapped: only the rows read
    become resident) and dequantised on use."""

    def __init__(self, f: GGUFFile, name: str, dtype: torch.dtype) -> None:
        super().__init__()
        info = f.tensors[name]
        self.file, self.qtype, self.dim, self.dtype = f, info.qtype, info.rows_cols[1], dtype
        self.raw = f.raw(name)                                                      # [V, row bytes] (the map)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        from kvoffload.kernels.qweights import gguf_gather

        rows = gguf_gather(self.raw, self.qtype, self.dim, tokens.reshape(-1).numpy())   # [n, d] fp32
        return torch.from_numpy(rows).to(self.dtype).view(*tokens.shape, self.dim)


def layer_weight_type(f: GGUFFile) -> str:
    """The ggml type name of most layer weights (\"Q4_1\", \"Q5_0\", \"F32\", ...)."""
    from collections import Counter

    from gguf.constants import GGMLQuantizationType

    types = Counter(t.qtype for name, t in f.tensors.items() if name.startswith("blk.") and name.endswith(".weight")
                    and len(t.shape) == 2)
    return GGMLQuantizationType(types.most_common(1)[0][0]).name if types else "F32"
