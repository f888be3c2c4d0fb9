"""Double Sparsity (Yang et al., arXiv 2408.07092): token sparsity guided by offline-calibrated
channel sparsity.

``kvoffload calibrate`` ranks, per layer and KV head, the channels by the mean of
``|q * k|`` (post-RoPE query and key of the same token, the group's query heads summed) over
every calibration block, and writes the order to a JSON file (the authors' ``qk`` ranking;
their script keeps only the last block's statistics, a bug we do not copy). At run time a
label cache holds the top ``r`` of those channels of every key (``r = D / 4`` by default, the
code's 32 of 128); approximate scores ``q[r] . k[r]`` pick the top-k tokens per KV head;
exact attention runs over them (the whole block of a chosen token is read). Defaults: layers
0 and 1 dense, no sinks or window beyond the tail block (as the authors' code).

Not done: the offload variant's prediction of layer i+1's selection from layer i's input
(it needs the next layer's query projection, which the backend does not see).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from kvoffload.errors import ConfigError
from kvoffload.sparse.base import (
    TILE,
    SparsePolicy,
    group_max,
    tiled,
    tiled_columns,
    tiled_grow,
    tiled_matmul,
    tiled_write,
)

CALIBRATION_FORMAT = "kvoffload-channels/1"


def load_channels(path: str | None, model, r: int) -> list[torch.Tensor]:
    """Per layer, the ``[H_kv, r]`` top calibrated channels of each KV head."""
    if not path:
        raise ConfigError("double_sparsity needs --sparse-calibration FILE (write one with `kvoffload calibrate`)")
    if not os.path.isfile(path):
        raise ConfigError(f"calibration file {path} does not exist")
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        raise ConfigError(f"calibration file {path} is not a kvoffload channel file ({e})") from None
    if not isinstance(data, dict) or "channels" not in data or "format" not in data:
        raise ConfigError(f"calibration file {path} is not a kvoffload channel file "
                          "(expected a JSON object with 'format' and 'channels')")
    fmt = data["format"]
    if fmt != CALIBRATION_FORMAT:
        raise ConfigError(f"calibration file {path} has format {fmt!r:.60}, expected {CALIBRATION_FORMAT!r}")
    L, H, D = model.num_layers, model.num_kv_heads, model.head_dim
    channels = data["channels"]

    def bad(where: str, what: str) -> ConfigError:
        return ConfigError(f"calibration file {path}: {where} {what} (this model has {L} layers x {H} KV heads x "
                           f"{D} channels, each head's channels 0..{D - 1} in ranked order)")

    if not isinstance(channels, list) or len(channels) != L:
        got = len(channels) if isinstance(channels, list) else type(channels).__name__
        raise bad("channels", f"must be a list of {L} layers, got {got}")
    for i, layer in enumerate(channels):
        if not isinstance(layer, list) or len(layer) != H:
            raise bad(f"channels[{i}]", f"must be a list of {H} KV heads")
        for h, row in enumerate(layer):
            if not isinstance(row, list) or len(row) != D:
                raise bad(f"channels[{i}][{h}]", f"must be a list of {D} channels")
            for j, c in enumerate(row):
                if not isinstance(c, int) or isinstance(c, bool):
                    raise bad(f"channels[{i}][{h}][{j}]", f"must be an integer, got {c!r:.20}")
                if not 0 <= c < D:
                    raise bad(f"channels[{i}][{h}][{j}]", f"= {c} is out of range")
            if len(set(row)) != D:
                raise bad(f"channels[{i}][{h}]", "repeats a channel")
    t = torch.tensor(channels, dtype=torch.int64)
    return [t[i, :, :r].contiguous() for i in range(model.num_layers)]


@dataclass
class Labels:
    channels: torch.Tensor           # [H_kv, r] int64: this layer's calibrated channels
    k: torch.Tensor                  # [H_kv, tiles, r, TILE] fp32: those channels of every key (the
    #                                  label cache), tiled channel-major like SparF's copy
    hdr: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))   # [tokens appended]

    @property
    def n(self) -> int:
        return int(self.hdr[0])


class DoubleSparsity(SparsePolicy):
    name = "double_sparsity"
    dense_layers = (0, 1)

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.r = min(self.D, self.cfg.sparse_channels or max(1, self.D // 4))
        self.channels = [c.to(self.device) for c in load_channels(self.cfg.sparse_calibration, self.model, self.r)]

    @property
    def unit(self) -> int:
        return 1

    def new_state(self, layer: int, capacity: int) -> Labels:
        return Labels(self.channels[layer], tiled(self.H_kv, self.r, capacity, None, self.device))

    def capacity(self, st: Labels) -> int:
        return tiled_columns(st.k)

    def grow(self, st: Labels, tokens: int) -> None:
        st.k = tiled_grow(st.k, tokens, None)

    def native_row(self, st: Labels) -> tuple[int, ...]:
        return (st.k.data_ptr(), 0, 0, st.hdr.ctypes.data, tiled_columns(st.k))

    def native_aux(self, layer: int) -> int:
        return self.channels[layer].data_ptr()

    def native_args(self) -> dict:
        return {"r": self.r}

    def _load_kernel(self):
        # the kernel indexes q and k by the channels: only a file's channels within the head
        if any(bool(((c < 0) | (c >= self.D)).any()) or not c.is_contiguous() for c in self.channels):
            self._kernel = False
            return False
        return super()._load_kernel()

    def update(self, st: Labels, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        end = start + k.shape[1]
        self.reserve(st, end)
        lab = k.float().gather(-1, st.channels[:, None, :].expand(-1, k.shape[1], -1))   # [H_kv, L, r]
        if k.shape[1] == 1:                                              # a decode step
            t, o = divmod(start, TILE)
            st.k[:, t, :, o] = lab[:, 0]
        else:
            tiled_write(st.k, start, lab.transpose(1, 2))
        st.hdr[0] = max(st.n, end)

    def score(self, st: Labels, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        q_lab = q.gather(-1, st.channels[:, None, :].expand(-1, q.shape[1], -1))   # [H_kv, G, r]
        return group_max(tiled_matmul(q_lab, st.k, lo * self.bs, hi * self.bs))   # [H_kv, n]
