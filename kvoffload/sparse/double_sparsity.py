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
from dataclasses import dataclass

import torch

from kvoffload.errors import ConfigError
from kvoffload.sparse.base import SparsePolicy, TokenStore, group_max

CALIBRATION_FORMAT = "kvoffload-channels/1"


def load_channels(path: str | None, model, r: int) -> list[torch.Tensor]:
    """Per layer, the ``[H_kv, r]`` top calibrated channels of each KV head."""
    if not path:
        raise ConfigError("double_sparsity needs --sparse-calibration FILE (write one with `kvoffload calibrate`)")
    if not os.path.isfile(path):
        raise ConfigError(f"calibration file {path} does not exist")
    try:
        with open(path) as f:
            data = json.load(f)
        channels = data["channels"]
        fmt = data["format"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"calibration file {path} is not a kvoffload channel file ({e})") from None
    if fmt != CALIBRATION_FORMAT:
        raise ConfigError(f"calibration file {path} has format {fmt!r}, expected {CALIBRATION_FORMAT!r}")
    shape = (model.num_layers, model.num_kv_heads, model.head_dim)
    t = torch.tensor(channels, dtype=torch.int64)
    if tuple(t.shape) != shape:
        raise ConfigError(f"calibration file {path} is for [layers, kv heads, head dim] = {list(t.shape)}, "
                          f"this model has {list(shape)}")
    return [t[i, :, :r].contiguous() for i in range(model.num_layers)]


@dataclass
class Labels:
    channels: torch.Tensor           # [H_kv, r] this layer's calibrated channels
    store: TokenStore                # [H_kv, T, r] those channels of every key (the label cache)


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
        return Labels(self.channels[layer], TokenStore(self.H_kv, self.r, capacity, torch.float32, self.device))

    def update(self, st: Labels, start: int, k: torch.Tensor, v: torch.Tensor) -> None:
        st.store.write(start, k.float().gather(-1, st.channels[:, None, :].expand(-1, k.shape[1], -1)))

    def score(self, st: Labels, q: torch.Tensor, lo: int, hi: int, length: int) -> torch.Tensor:
        q_lab = q.gather(-1, st.channels[:, None, :].expand(-1, q.shape[1], -1))   # [H_kv, G, r]
        labels = st.store.view()[:, lo * self.bs:hi * self.bs]                    # [H_kv, n, r]
        return group_max(torch.matmul(q_lab, labels.transpose(1, 2)))             # [H_kv, n]
