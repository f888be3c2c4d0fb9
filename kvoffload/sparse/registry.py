"""Every sparse policy by name (``--sparse-policy``); tests are parametrised over this table."""

from __future__ import annotations

from kvoffload.sparse.base import SparsePolicy
from kvoffload.sparse.double_sparsity import DoubleSparsity
from kvoffload.sparse.quest import Quest
from kvoffload.sparse.retrieval import Retrieval
from kvoffload.sparse.shadowkv import ShadowKV
from kvoffload.sparse.shadowkv_lowrank import ShadowKVLowRank
from kvoffload.sparse.sparf import SparF
from kvoffload.sparse.streaming import Streaming

POLICIES: dict[str, type[SparsePolicy]] = {
    "streaming": Streaming,
    "quest": Quest,
    "sparf": SparF,
    "double_sparsity": DoubleSparsity,
    "shadowkv": ShadowKV,
    "shadowkv_lowrank": ShadowKVLowRank,
    "retrieval": Retrieval,
}
