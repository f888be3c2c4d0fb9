"""Frozen dataclasses, one per concern.

* :class:`RopeScaling`, :class:`ModelConfig` — what a checkpoint *is* (read from its files).
* :class:`KVConfig` — where the KV cache lives (block size, tier budgets, disk workers).
* :class:`SparseConfig` — which KV a decode step reads (sparse attention policies).
* :class:`SpecConfig` — self-speculative decoding (draft cache, gamma, rebuilds).
* :class:`StoreConfig` — the persistent KV block store (prefix reuse across processes).
* :class:`EngineConfig` — how we run it (device, dtypes, weight format, chunking, batching).
* :class:`SamplingParams` — how one request picks its tokens.

CLI flags are derived from the fields that carry ``metadata["flag"]`` (see
:func:`kvoffload.cli.args.add_dataclass_args`); names follow vLLM / llama.cpp
where the meaning matches.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import typing
from dataclasses import dataclass, field
from typing import Any

from kvoffload.dtypes import KV_NAMES, NAMES, QUANT
from kvoffload.errors import ConfigError, ConfigTypeError


def cli_field(default: Any, help: str, flag: str | None = None, choices: tuple | None = None,
              short: str | None = None, parse: Any = None) -> Any:
    """A dataclass field that is also a CLI flag (``--field-name`` unless ``flag`` is given);
    ``parse`` turns the flag's text into the value (default: the field's type)."""
    meta = {"help": help, "cli": True, "flag": flag, "choices": choices, "short": short, "parse": parse}
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if typing.get_origin(tp) is tuple:
        return f"a tuple of {_type_name(typing.get_args(tp)[0])}"
    args = typing.get_args(tp)
    if args:
        return " or ".join(_type_name(a) for a in args)
    return {int: "an int", float: "a number", str: "a string", bool: "a bool"}.get(tp, getattr(tp, "__name__", str(tp)))


def _has_type(value: Any, tp: Any) -> bool:
    if tp is Any:
        return True
    if tp is type(None):
        return value is None
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    if args:                                        # a union (X | None)
        return any(_has_type(value, a) for a in args)
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    return isinstance(value, tp)


def check_types(obj: Any) -> None:
    """Every field of a config dataclass holds a value of its annotated type (fields with their
    own parser take text too and are checked by it); else a :class:`ConfigTypeError` that names
    the field and the type."""
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        if f.metadata.get("parse"):
            continue
        value = getattr(obj, f.name)
        if not _has_type(value, hints[f.name]):
            raise ConfigTypeError(f"{f.name} must be {_type_name(hints[f.name])}, "
                                  f"got {type(value).__name__} {value!r:.60}")


# --------------------------------------------------------------------------- model

@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling.

    kind: ``"linear"`` (positions divided by ``factor``) or ``"llama3"``
        (Llama 3.1 piecewise scaling of the inverse frequencies).
    factor: the scaling factor.
    low_freq_factor, high_freq_factor, original_max_position: llama3 parameters.
    freq_factors: explicit per-frequency divisors (GGUF ``rope_freqs.weight``);
        when set they replace the llama3 formula (llama.cpp stores them precomputed).
    """

    kind: str
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int = 8192
    freq_factors: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("linear", "llama3"):
            raise ConfigError(f"unsupported rope scaling type {self.kind!r} (supported: linear, llama3)")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture hyper-parameters of a Llama-family decoder.

    arch: family name as the checkpoint says it (``llama``, ``mistral``, ``qwen2``).
    vocab_size, hidden_size, intermediate_size, num_layers: the usual.
    num_heads / num_kv_heads: query heads / key-value heads (GQA when fewer).
    head_dim: per-head width (``hidden_size // num_heads`` unless the checkpoint says otherwise).
    rms_eps: RMSNorm epsilon.
    rope_theta: RoPE base; rope_scaling: optional :class:`RopeScaling`.
    max_position: the context length the model was trained for.
    tie_embeddings: the output projection reuses the token embedding.
    qkv_bias: q/k/v projections carry a bias (Qwen2).
    """

    arch: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position: int = 4096
    tie_embeddings: bool = False
    qkv_bias: bool = False

    def __post_init__(self) -> None:
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim {self.head_dim} must be even for RoPE")

    @property
    def num_params(self) -> int:
        d, f, v = self.hidden_size, self.intermediate_size, self.vocab_size
        qkv = d * (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        attn = qkv + self.num_heads * self.head_dim * d
        if self.qkv_bias:
            attn += (self.num_heads + 2 * self.num_kv_heads) * self.head_dim
        layer = attn + 3 * d * f + 2 * d
        return self.num_layers * layer + v * d * (1 if self.tie_embeddings else 2) + d

    def kv_bytes_per_token(self, bytes_per_elem: int = 2) -> int:
        """K and V of one token over all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * bytes_per_elem



# --------------------------------------------------------------------------- KV tiers

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 10**6, "mb": 10**6, "mib": 2**20,
          "g": 10**9, "gb": 10**9, "gib": 2**30, "t": 10**12, "tb": 10**12, "tib": 2**40}


def parse_size(text: str | int | None) -> int | None:
    """``"256MiB"``, ``"2GiB"``, ``"1.5G"``, ``"4096"`` -> bytes; ``None``/``"none"``/``"inf"`` -> None (unlimited)."""
    if text is None or isinstance(text, int):
        return text
    t = str(text).strip().lower().replace(" ", "")
    if t in ("none", "inf", "unlimited"):
        return None
    num = t.rstrip("abcdefghijklmnopqrstuvwxyz")
    unit = t[len(num):]
    try:
        value = float(num)
    except ValueError:
        value = -1.0
    if unit not in _UNITS or value < 0 or not math.isfinite(value):
        raise ConfigError(f"bad size {text!r} (examples: 0, 64MiB, 2GiB, 1.5G, none)")
    return int(value * _UNITS[unit])


def parse_tiers(text: str | None) -> tuple[tuple[str, int | None], ...] | None:
    """``"host:64MiB,disk:4GiB"`` -> (("host", 67108864), ("disk", 4294967296)); a budget may be
    ``none`` (unlimited). Tier names are checked against the registry when the store is built."""
    if text is None or isinstance(text, tuple):
        return text
    out = []
    for item in str(text).split(","):
        name, sep, budget = item.strip().partition(":")
        name = name.strip().lower()
        if not sep or not name:
            raise ConfigError(f"bad --kv-tiers entry {item.strip()!r} (expected NAME:BUDGET, e.g. host:64MiB,disk:4GiB)")
        if name in (n for n, _ in out):
            raise ConfigError(f"--kv-tiers names the {name} tier twice")
        out.append((name, parse_size(budget)))
    return tuple(out)


@dataclass(frozen=True)
class KVConfig:
    """Where the KV cache lives. Setting ``kv_tiers``, any budget or ``offload_dir`` turns on the
    tiered store (otherwise each sequence's KV is one contiguous in-memory buffer, the fastest
    layout when everything fits).

    block_size: tokens per block (InstInfer's 16: 16 x 128 dims x fp16 = one 4 KiB flash page).
    chunk_blocks: blocks per chunk, the unit of placement (a chunk's blocks live in one tier, in
        consecutive slots: one read on disk) and the fixed boundary of partial attention (each
        chunk's partial is computed alone and the partials merge in sequence order, so every
        placement gives bit-identical outputs). The in-memory backend uses it too.
    kv_tiers: the tiers, fastest first, each a registered tier name and its byte budget:
        ``host:64MiB,disk:4GiB`` (``none`` = unlimited; for disk, the free space). Tiers:
        ``device`` (the compute device's memory), ``host`` (RAM; pinned on CUDA), ``disk``,
        ``ray`` (actors on a Ray cluster's nodes, which attend their shards there: ``ray_*``).
    kv_device_budget, kv_host_budget, kv_disk_budget: shorthands for ``kv_tiers`` (used when it
        is not given): ``device:B1,host:B2,disk:B3``, where an unset device budget means
        unlimited on CUDA and 0 (no device tier) on the CPU, whose device memory *is* host RAM;
        an unset host budget is unlimited, an unset disk budget the free space; 0 = tier unused.
    offload_dir: where the disk tier's files go; a fresh ``kvoffload-*`` directory is made inside
        it and removed at exit (default: the system temporary directory).
    disk_workers: processes that own the disk files (one shard each) and compute attention over
        their blocks — the emulated computational-storage engines. 0: no worker processes; this
        process reads the chosen blocks of its one shard file (O_DIRECT, many reads in flight)
        and attends them itself — faster on hosts with few cores, where waking a worker costs
        more than a sparse layer's reads.
    kv_sink_tokens, kv_recent_tokens: the first / last tokens of each sequence whose chunks are
        never demoted to a slower tier while others can be (attention sinks, recent window).
    disk_read_batch: bytes a disk worker reads per batch (two such buffers per worker: one is
        read while the other is attended; with native AIO a batch's reads are all in flight at
        once, so this is also how much the disk is given to do while a batch computes).
    disk_write_backlog: blocks sent to a disk worker are kept in RAM until it acknowledges the
        write (so they can be replayed if it dies); past this many bytes the sender waits, which
        bounds the RAM a long prefill can take.
    disk_read_blocks: the disk workers read chosen blocks (sparse decode) in aligned groups of
        this many blocks (1: exactly the chosen blocks): fewer, larger reads for scattered
        choices, at the cost of reading blocks nobody chose (the read amplification reported).
    disk_io_depth: reads in flight per disk worker (0: with native AIO a batch's or a
        read-ahead's reads all at once, up to 64; with reader threads by request size, about
        2 MiB in flight, 2 to 16 reads; `kvoffload bench disk` shows what a disk wants).
    disk_reader: how the disk tier issues its reads: ``aio`` (Linux native AIO on the O_DIRECT
        shard file: one call queues a batch's reads, one waits for them, no reader threads to
        schedule beside the model's), ``threads`` (a pool of ``preadv`` threads, one per read in
        flight), ``auto`` (aio where the kernel allows it and the file is O_DIRECT, else threads).
    disk_worker_timeout: seconds a disk worker may take to answer a request; one that does not
        (stopped, hung) is killed and treated as a crash: restarted and the request replayed,
        or a one-line error after the restart limit.
    disk_read_ahead: during decode each disk worker is told the next layer's blocks as soon as
        this layer's query is sent, and reads up to this many bytes of them ahead, so the read
        overlaps the model's compute of that layer and, in a worker process, this layer's
        attend (0 = off; two buffers of up to this size per worker, grown to what the layers
        need: the next layer's read-ahead goes to one while this layer's attend reads the other).
        It gains most when it holds a worker's share of a whole layer.
    disk_block_cache: RAM for a cache of the disk blocks that sparse decode reads, kept for the
        next steps (consecutive tokens choose mostly the same blocks), split over the disk
        shards; least recently used blocks go first, but never one used within the current step.
        When ``kv_host_budget`` is set the cache is part of it (the host tier gets the rest),
        so the KV's RAM stays within that budget. 0 = no cache.
    kv_serial: submit to one tier and wait for it before the next (default: every tier is
        started, then the fastest is computed here while the others work).
    arena_segment_slots: memory tiers grow in segments of about this many blocks.
    ray_address: the Ray cluster the ``ray`` tier's actors run on: ``HOST:PORT`` of its head
        (what ``ray start --head`` prints), ``auto`` (the cluster running on this machine), or
        ``None`` (``RAY_ADDRESS``, else a Ray instance started here for this run).
    ray_shards: actors that own the ``ray`` tier's KV, one shard each, spread over the cluster's
        nodes (a placement group with the ``SPREAD`` strategy); the tier's budget is shared
        evenly: each actor reserves ``budget / ray_shards`` bytes of Ray's ``memory`` resource, so
        Ray places it only on a node with that much to give.
    ray_shard_cpus: CPUs each actor reserves (and its attention threads).
    ray_storage: where an actor keeps its blocks: ``memory`` (its RAM) or ``disk`` (a private
        file on its node's local disk, read as the disk tier's workers read theirs).
    ray_timeout: seconds any call to an actor may take (a deadline on every remote call: never
        a hang); an actor that misses it, dies or loses its node is replaced — in its bundle of
        the placement group, which Ray moves to a live node — and its shard rebuilt by replaying
        its writes from the journal; a shard that cannot be placed again within this time ends
        the run with a one-line error naming the node it was on.
    ray_exact: the driver merges every chunk's partial in sequence order (bit-identical to the
        all-in-memory run) instead of each actor merging its chunks of a batch row into one
        (fp32-rounding close; the reply is then one (o, lse) per row and shard, whatever the
        context length — Lamina's ``(2 + 2/G)·e·d`` bytes per token and layer).
    kv_group_size: channels per value group of a compressed KV block (``--kv-dtype int8/int4``;
        0 = the whole head: one scale and minimum per token and head); it must divide the head
        dimension. Keys are grouped per channel over the tokens of a block.
    prefix_sharing: sequences whose prompts begin with the same full blocks (a batch of
        questions about one document, a system prompt) share them: a sequence admitted while
        another live one holds its prompt's leading blocks starts its prefill after them. In the
        tiered store their whole chunks are referenced by each sequence's block table (held and
        counted against the budgets once, freed when the last user is done; the blocks of a
        partly shared chunk are copied); the in-memory backend (one buffer per sequence) copies
        them. ``--no-prefix-sharing``: every prompt is prefilled in full.
    """

    block_size: int = cli_field(16, "tokens per KV block")
    chunk_blocks: int = cli_field(16, "blocks per chunk: the unit of placement and of partial attention", flag="--kv-chunk-blocks")
    kv_tiers: tuple[tuple[str, int | None], ...] | None = cli_field(
        None, "KV tiers fastest first with their budgets, e.g. host:64MiB,disk:4GiB (default: from the --kv-*-budget flags)",
        parse=parse_tiers)
    kv_device_budget: int | None = cli_field(None, "KV bytes in device memory, e.g. 2GiB (default: unlimited on CUDA, 0 on CPU)", parse=parse_size)
    kv_host_budget: int | None = cli_field(None, "KV bytes in host RAM, e.g. 256MiB (default: unlimited)", parse=parse_size)
    kv_disk_budget: int | None = cli_field(None, "KV bytes on disk (default: the free space)", parse=parse_size)
    offload_dir: str | None = cli_field(None, "directory for the disk tier (default: system temp dir)")
    disk_workers: int = cli_field(2, "disk worker processes (one file shard each; 0 = read and attend the disk in this process)")
    kv_sink_tokens: int = cli_field(4, "first tokens of a sequence kept in the fastest tier")
    kv_recent_tokens: int = cli_field(256, "last tokens of a sequence kept in the fastest tier")
    disk_read_batch: int = cli_field(4 << 20, "bytes per disk worker read batch", parse=parse_size)
    disk_read_blocks: int = cli_field(1, "sparse reads from disk in aligned groups of this many blocks (1 = exact)")
    disk_io_depth: int = cli_field(0, "reads in flight per disk worker (0 = a batch's reads at once with native AIO, "
                                   "by request size with reader threads)")
    disk_reader: str = cli_field("auto", "how the disk tier reads: aio (Linux native AIO), threads (a pool of pread threads), auto (aio where the kernel and file allow)", choices=("auto", "aio", "threads"))
    disk_worker_timeout: float = cli_field(60.0, "seconds a disk worker may take to answer before it counts as hung "
                                           "(it is then killed, restarted and the request replayed)")
    disk_read_ahead: int = cli_field(8 << 20, "bytes of the next layer's blocks a disk worker reads ahead, at most (0 = off)", parse=parse_size)
    disk_write_backlog: int = cli_field(32 << 20, "bytes of unacknowledged block writes per disk worker before waiting", parse=parse_size)
    disk_block_cache: int = cli_field(0, "RAM for a cache of the disk blocks sparse decode reads, e.g. 8MiB "
                                      "(part of --kv-host-budget when that is set; 0 = none)", parse=parse_size)
    kv_serial: bool = cli_field(False, "run the tier workers one after another instead of together (measures what the overlap buys)")
    arena_segment_slots: int = 256
    ray_address: str | None = cli_field(None, "Ray cluster of the ray KV tier: HOST:PORT of its head, or auto "
                                         "(default: RAY_ADDRESS, else a Ray instance started for this run)")
    ray_shards: int = cli_field(2, "ray KV tier: actors (one KV shard each) spread over the cluster's nodes")
    ray_shard_cpus: float = cli_field(1.0, "ray KV tier: CPUs each actor reserves (its attention threads)")
    ray_storage: str = cli_field("memory", "ray KV tier: where an actor keeps its blocks (its RAM, or its node's disk)",
                                 choices=("memory", "disk"))
    ray_timeout: float = cli_field(30.0, "ray KV tier: seconds any call to an actor may take before it is "
                                   "replaced and its shard rebuilt from the journal")
    ray_exact: bool = cli_field(False, "ray KV tier: merge every chunk's partial here in sequence order "
                                "(bit-identical to in-memory; replies grow with the context)")
    kv_group_size: int = cli_field(0, "channels per value group of a compressed KV block (0 = the whole head)")
    prefix_sharing: bool = cli_field(True, "sequences with a common prompt prefix share its KV blocks: prefilled once, "
                                     "held once (default: on)")

    def __post_init__(self) -> None:
        check_types(self)
        for name in ("kv_device_budget", "kv_host_budget", "kv_disk_budget", "disk_read_batch", "disk_read_ahead",
                     "disk_write_backlog", "disk_block_cache"):
            object.__setattr__(self, name, parse_size(getattr(self, name)))
        object.__setattr__(self, "kv_tiers", parse_tiers(self.kv_tiers))
        if not 1 <= self.block_size <= 256:
            raise ConfigError(f"block_size must be in 1..256, got {self.block_size}")
        if self.chunk_blocks < 1:
            raise ConfigError(f"kv_chunk_blocks must be >= 1, got {self.chunk_blocks}")
        if not 0 <= self.disk_io_depth <= 64:
            raise ConfigError(f"disk_io_depth must be 0 (by request size) to 64, got {self.disk_io_depth}")
        if self.disk_read_blocks < 1 or self.chunk_blocks % self.disk_read_blocks:
            raise ConfigError(f"disk_read_blocks must divide kv_chunk_blocks ({self.chunk_blocks}), got {self.disk_read_blocks}")
        if self.kv_group_size < 0:
            raise ConfigError(f"kv_group_size must be >= 0 (0 = the whole head), got {self.kv_group_size}")
        if self.disk_workers < 0:
            raise ConfigError(f"disk_workers must be >= 0 (0: this process reads the disk), got {self.disk_workers}")
        if self.kv_sink_tokens < 0 or self.kv_recent_tokens < 0:
            raise ConfigError("kv_sink_tokens and kv_recent_tokens must be >= 0")
        if self.disk_read_batch is None or self.disk_read_batch < 1:
            raise ConfigError("disk_read_batch must be a positive size")
        if self.disk_read_ahead is None or self.disk_write_backlog is None or self.disk_block_cache is None:
            raise ConfigError("disk_read_ahead, disk_write_backlog and disk_block_cache must be sizes")
        if self.kv_host_budget is not None and self.disk_block_cache > self.kv_host_budget:
            raise ConfigError(f"--disk-block-cache ({self.disk_block_cache} bytes) is part of --kv-host-budget "
                              f"({self.kv_host_budget} bytes) and cannot exceed it")
        if not (self.disk_worker_timeout > 0 and math.isfinite(self.disk_worker_timeout)):
            raise ConfigError(f"disk_worker_timeout must be a number of seconds > 0, got {self.disk_worker_timeout}")
        if self.ray_storage not in ("memory", "disk"):
            raise ConfigError(f"ray_storage must be memory or disk, got {self.ray_storage!r}")
        if self.ray_shards < 1:
            raise ConfigError(f"ray_shards must be >= 1, got {self.ray_shards}")
        if not (self.ray_shard_cpus > 0 and math.isfinite(self.ray_shard_cpus)):
            raise ConfigError(f"ray_shard_cpus must be a number > 0, got {self.ray_shard_cpus}")
        if not (self.ray_timeout > 0 and math.isfinite(self.ray_timeout)):
            raise ConfigError(f"ray_timeout must be a number of seconds > 0, got {self.ray_timeout}")
        if self.kv_tiers is not None and self._shorthands:
            raise ConfigError("--kv-tiers gives every tier's budget: drop --" + ", --".join(
                n.replace("_", "-") for n in self._shorthands))

    @property
    def _shorthands(self) -> list[str]:
        return [n for n in ("kv_device_budget", "kv_host_budget", "kv_disk_budget") if getattr(self, n) is not None]

    @property
    def tiered(self) -> bool:
        return self.kv_tiers is not None or self.offload_dir is not None or bool(self._shorthands)

    def tier_list(self, device_type: str) -> tuple[tuple[str, int | None], ...]:
        """The ordered (tier name, budget) list: ``kv_tiers``, or the one the shorthands spell
        (``device_type``: the compute device's, which decides the device tier's default)."""
        if self.kv_tiers is not None:
            return self.kv_tiers
        device = self.kv_device_budget if self.kv_device_budget is not None else (None if device_type == "cuda" else 0)
        host = self.kv_host_budget
        if host is not None:
            host -= self.disk_block_cache               # the disk tier's block cache is RAM too
        return (("device", device), ("host", host), ("disk", self.kv_disk_budget))

# --------------------------------------------------------------------------- sparse attention

def parse_budget(text: str | float) -> tuple[str, float]:
    """``"1/16"`` or ``"0.0625"`` -> ("fraction", 0.0625); ``"512"`` -> ("tokens", 512);
    ``"all"`` -> ("fraction", 1.0). A fraction is of the sequence's current length."""
    t = str(text).strip().lower()
    if t in ("all", "full", "1", "1/1"):
        return "fraction", 1.0
    try:
        if "/" in t:
            num, den = t.split("/", 1)
            value = float(num) / float(den)
        else:
            value = float(t)
    except (ValueError, ZeroDivisionError):
        value = -1.0
    if not math.isfinite(value) or value <= 0:
        raise ConfigError(f"bad sparse budget {text!r} (examples: 1/16, 0.125, 512 tokens, all)")
    if "/" in t or "." in t:
        if value > 1:
            raise ConfigError(f"sparse budget fraction {text!r} is more than 1")
        return "fraction", value
    if value != int(value):
        raise ConfigError(f"sparse budget {text!r}: a token count must be a whole number")
    return "tokens", float(value)


def parse_layers(text: str | tuple | None) -> tuple[int, ...] | None:
    """``"0,1"`` -> (0, 1); ``"none"`` -> (); ``None`` -> None (the policy's default)."""
    if text is None or isinstance(text, tuple):
        return text
    t = str(text).strip().lower()
    if t in ("none", ""):
        return ()
    try:
        layers = tuple(int(x) for x in t.split(","))
    except ValueError:
        raise ConfigError(f"bad layer list {text!r} (example: 0,1)") from None
    if any(x < 0 for x in layers):
        raise ConfigError(f"layer numbers must be >= 0, got {text!r}")
    return layers


@dataclass(frozen=True)
class SparseConfig:
    """Sparse decode attention: which policy picks the KV each decode step reads (prefill is
    always dense). The defaults of every ``None`` field are the policy's own (its paper's; see
    ``kvoffload/sparse/``).

    sparse_policy: ``dense`` (read everything) or a name in :data:`kvoffload.sparse.POLICIES`.
    sparse_budget: KV tokens each (layer, KV head) attends per decode step: a fraction of the
        sequence's length (``1/16``, ``0.0625``) or a token count (``512``). Sink, recent-window
        and tail tokens count against it; a budget that covers the sequence reads everything.
    sparse_dense_layers: layers that always attend everything (``0,1``; ``none``).
    sparse_sink_tokens: first tokens always attended (rounded up to whole blocks).
    sparse_recent_tokens: last tokens always attended (the partial tail block and whole blocks
        before it).
    sparse_channels: ``sparf`` / ``double_sparsity``: channels per head used for approximate
        scores (``None``: the policy's default fraction of the head dim).
    sparse_calibration: ``double_sparsity``: the channel file written by ``kvoffload calibrate``.
    sparse_chunk: ``shadowkv`` / ``retrieval``: tokens per landmark chunk.
    sparse_rank: ``shadowkv_lowrank``: rank of the low-rank pre-RoPE keys (one SVD per layer
        over the KV heads' channels; ``None``: 5/32 of ``num_kv_heads * head_dim``, ShadowKV's
        160 of Llama-3-8B's 1024; at or above ``num_kv_heads * head_dim``: full rank).
    sparse_prefetch: with KV in a tier that reads ahead (disk), guess the next sparse layer's
        blocks from this layer's query and its own metadata, and read them ahead (the layer
        then attends what its own selection chooses; missed blocks are read on demand).
    """

    sparse_policy: str = cli_field("dense", "sparse decode attention policy: dense, streaming, quest, sparf, double_sparsity, shadowkv, shadowkv_lowrank, retrieval")
    sparse_budget: str = cli_field("1/16", "KV per decode step and KV head: fraction of the context (1/16, 0.125) or tokens (512)",
                                   parse=parse_budget)
    sparse_dense_layers: tuple[int, ...] | None = cli_field(None, "layers kept dense, e.g. 0,1 or none (default: the policy's)", parse=parse_layers)
    sparse_sink_tokens: int | None = cli_field(None, "first tokens always attended (default: the policy's)")
    sparse_recent_tokens: int | None = cli_field(None, "last tokens always attended (default: the policy's)")
    sparse_channels: int | None = cli_field(None, "sparf/double_sparsity: channels per head for approximate scores")
    sparse_calibration: str | None = cli_field(None, "double_sparsity: channel file from `kvoffload calibrate`")
    sparse_chunk: int = cli_field(8, "shadowkv/retrieval: tokens per landmark chunk")
    sparse_rank: int | None = cli_field(None, "shadowkv_lowrank: rank of the low-rank pre-RoPE keys (default 5/32 of kv_heads x head_dim)")
    sparse_prefetch: bool = cli_field(False, "read ahead the next sparse layer's guessed blocks from disk")

    def __post_init__(self) -> None:
        check_types(self)
        object.__setattr__(self, "sparse_dense_layers", parse_layers(self.sparse_dense_layers))
        self._budget                         # noqa: B018 - parsed (and checked) once, here
        for name in ("sparse_sink_tokens", "sparse_recent_tokens"):
            v = getattr(self, name)
            if v is not None and v < 0:
                raise ConfigError(f"{name} must be >= 0, got {v}")
        if self.sparse_channels is not None and self.sparse_channels < 1:
            raise ConfigError(f"sparse_channels must be >= 1, got {self.sparse_channels}")
        if self.sparse_rank is not None and self.sparse_rank < 1:
            raise ConfigError(f"sparse_rank must be >= 1, got {self.sparse_rank}")
        if self.sparse_chunk < 1:
            raise ConfigError(f"sparse_chunk must be >= 1, got {self.sparse_chunk}")

    @property
    def enabled(self) -> bool:
        return self.sparse_policy != "dense"

    @functools.cached_property
    def _budget(self) -> tuple[str, float]:
        return parse_budget(self.sparse_budget)

    def budget_tokens(self, length: int) -> int:
        """Tokens a (layer, KV head) may attend in a sequence of ``length`` tokens."""
        kind, value = self._budget
        return int(value) if kind == "tokens" else max(1, math.ceil(value * length))


# --------------------------------------------------------------------------- speculation

SPECULATE = ("none", "self")


@dataclass(frozen=True)
class SpecConfig:
    """Lossless self-speculative decoding (TriForce): the target model attending only a small
    draft cache in fast memory proposes ``num_speculative_tokens`` tokens; one forward of the
    full model over the whole (offloaded) KV verifies them; speculative sampling keeps the
    output distribution the target's (greedy: the same tokens).

    speculate: ``none`` or ``self`` (the draft is the target model with a draft cache).
    num_speculative_tokens: gamma, draft tokens per verification (vLLM's name).
    spec_draft_policy: how the draft cache is chosen from the full KV: ``retrieval``
        (TriForce: 8-token chunks scored by their mean key against the query, the first chunk
        always kept) or any other registered sparse policy.
    spec_draft_budget: tokens of the full KV the draft cache takes at a rebuild, at most ...
    spec_draft_share: ... this share of the context (``1/8``): the budget is scaled down for
        contexts shorter than ``budget / share`` (TriForce's 4096 of 120K is 3%).
    spec_draft_window: tokens appended to the draft cache after a rebuild (the verified ones)
        before it must be rebuilt; it also bounds its memory: budget + window + gamma tokens.
    spec_rebuild_interval: rebuild the draft cache every this many verifications (0 = only
        when the window is full or acceptance drops).
    spec_rebuild_acceptance: rebuild when the acceptance rate over the last
        ``spec_rebuild_rounds`` verifications falls below this (0 = never on acceptance).
    spec_rebuild_rounds: verifications the acceptance trigger averages over.
    """

    speculate: str = cli_field("none", "speculative decoding: none, or self (sparse-KV self-draft, TriForce)", choices=SPECULATE)
    num_speculative_tokens: int = cli_field(4, "draft tokens per verification (gamma)")
    spec_draft_policy: str = cli_field("retrieval", "policy that fills the draft cache: retrieval (TriForce) or any sparse policy")
    spec_draft_budget: int = cli_field(4096, "tokens the draft cache takes from the full KV at a rebuild (at most)")
    spec_draft_share: str = cli_field("1/8", "the draft budget is at most this share of the context", parse=parse_budget)
    spec_draft_window: int = cli_field(256, "verified tokens appended to the draft cache before it is rebuilt")
    spec_rebuild_interval: int = cli_field(0, "rebuild the draft cache every N verifications (0 = off)")
    spec_rebuild_acceptance: float = cli_field(0.0, "rebuild when recent acceptance falls below this (0 = off)")
    spec_rebuild_rounds: int = cli_field(8, "verifications the acceptance trigger averages over")

    def __post_init__(self) -> None:
        check_types(self)
        if self.speculate not in SPECULATE:
            raise ConfigError(f"speculate must be one of {', '.join(SPECULATE)}, got {self.speculate!r}")
        if not 1 <= self.num_speculative_tokens <= 32:
            raise ConfigError(f"num_speculative_tokens must be in 1..32, got {self.num_speculative_tokens}")
        if self.spec_draft_budget < 1:
            raise ConfigError(f"spec_draft_budget must be >= 1 token, got {self.spec_draft_budget}")
        kind, _ = self._share
        if kind != "fraction":
            raise ConfigError(f"spec_draft_share must be a fraction such as 1/8, got {self.spec_draft_share!r}")
        if self.spec_draft_window < 1:
            raise ConfigError(f"spec_draft_window must be >= 1, got {self.spec_draft_window}")
        if self.spec_rebuild_interval < 0:
            raise ConfigError(f"spec_rebuild_interval must be >= 0, got {self.spec_rebuild_interval}")
        if not 0.0 <= self.spec_rebuild_acceptance <= 1.0:
            raise ConfigError(f"spec_rebuild_acceptance must be in [0, 1], got {self.spec_rebuild_acceptance}")
        if self.spec_rebuild_rounds < 1:
            raise ConfigError(f"spec_rebuild_rounds must be >= 1, got {self.spec_rebuild_rounds}")

    @property
    def enabled(self) -> bool:
        return self.speculate != "none"

    @functools.cached_property
    def _share(self) -> tuple[str, float]:
        return parse_budget(self.spec_draft_share)

    def draft_budget(self, length: int) -> int:
        """Tokens of a ``length``-token context the draft cache takes at a rebuild."""
        return max(1, min(self.spec_draft_budget, math.ceil(self._share[1] * length)))


# --------------------------------------------------------------------------- persistent KV store

KV_STORE_FSYNC = ("file", "none")


@dataclass(frozen=True)
class StoreConfig:
    """The persistent KV block store (kvoffload/kv/persist/): prompt prefixes reused across
    requests and processes.

    kv_store: a directory (created 0700 if absent). Every full block of a prompt's KV is kept
        there, keyed by the model, the KV layout and the tokens; a prompt whose leading blocks
        are there skips their prefill. ``None``: no store.
    kv_store_budget: bytes the store may hold; past it the least recently used blocks not in
        use by this process are deleted (``None``: unlimited).
    kv_store_fsync: ``file``: each block file is fsynced before it is renamed into place (and
        its directory after), so a crash or power loss leaves only whole blocks; ``none``: no
        fsync (faster; a torn block fails its checksum and is recomputed).
    """

    kv_store: str | None = cli_field(None, "directory of a persistent KV block store: prompt prefixes found there skip their prefill, new ones are kept (default: none)")
    kv_store_budget: int | None = cli_field(None, "bytes the KV store may hold, e.g. 4GiB; least recently used blocks go first (default: unlimited)", parse=parse_size)
    kv_store_fsync: str = cli_field("file", "fsync policy of KV store writes: file (each block before its rename) or none", choices=KV_STORE_FSYNC)

    def __post_init__(self) -> None:
        check_types(self)
        object.__setattr__(self, "kv_store_budget", parse_size(self.kv_store_budget))
        if self.kv_store is not None and not self.kv_store.strip():
            raise ConfigError("kv_store must name a directory")
        if self.kv_store_fsync not in KV_STORE_FSYNC:
            raise ConfigError(f"kv_store_fsync must be one of {', '.join(KV_STORE_FSYNC)}, got {self.kv_store_fsync!r}")

    @property
    def enabled(self) -> bool:
        return self.kv_store is not None


# --------------------------------------------------------------------------- engine

DTYPES = NAMES            # kvoffload/dtypes.py is the one dtype table
QUANTIZATIONS = ("none", "int8", "int4")
DECODE_KERNELS = ("native", "torch")
SCHEDULING = ("prefill-first", "interleave")
AUTO = "auto"


@dataclass(frozen=True)
class EngineConfig:
    """How a model is run.

    model: GGUF file, Hugging Face directory or alias; ``None`` = embedded default.
    device: ``auto`` (CUDA when present, else CPU), ``cpu`` or ``cuda[:N]``.
    dtype: activation / compute dtype. ``auto``: bfloat16 where the hardware computes it
        natively (CPUs with AVX512-BF16/AMX, CUDA GPUs that support it), else float32.
    quantization: weight-only quantisation of the linear layers: ``none``, ``int8`` (per
        output channel) or ``int4`` (groups of 32). CPU packed kernels: PyTorch's are fast
        only with bfloat16 activations, the fused native layer (AVX-512 or AVX2) with fp32
        too. The packed weights are the only copy: prefill dequantises a layer's weights into
        a shared scratch buffer before its GEMMs. A GGUF loads straight
        into the format (no dense copy). ``auto`` on the CPU in bfloat16, or in float32 where
        the fused native layer runs (CPUs without native bf16, e.g. AVX2): ``int4`` when the
        file's weights are 4-bit (e.g. GGUF Q4_1, re-packed without loss of its codes),
        ``int8`` for other quantised GGUFs (Q5_0, Q6_K, Q8_0 ...: 4 bits would lose), ``none``
        for dense checkpoints. Under ``int8`` a GGUF layer in 4 bits keeps its codes as int4,
        and with ``decode_kernel`` native a Q5_0 layer its own 5-bit codes (``q5``).
    quant_max_rows: in the PyTorch path (``--decode-kernel torch``, and layers the native
        kernels cannot run), the packed kernels serve calls of at most this many rows (tokens
        in the forward); larger calls (prefill, big decode batches) use the dense GEMM.
    decode_kernel: with quantised weights, a forward of few rows runs each layer's norm,
        projections, RoPE and MLP as two native calls, and the LM head as one (``native``:
        kernels/decode.c), instead of ~20 PyTorch operators (``torch``, the reference). Few
        rows: up to where the native GEMV beats the dense GEMM, per format (int4 and q5 32 rows,
        so a short prompt's prefill too; int8 16; model/fused.py's ``FUSED_ROWS``).
    kv_dtype: KV cache dtype (``None`` = ``dtype``), or a compressed block format: ``int8`` /
        ``int4`` (keys quantised per channel over a block's tokens, values per token in groups of
        ``kv_group_size`` channels; scales inside the block; the partly filled last block stays
        in the compute dtype; always the block store, in host RAM when no tier is given).
    threads: intra-op CPU threads (``None`` = PyTorch default = physical cores).
    prefill_chunk: prompt tokens per prefill forward (bounds activation memory).
    max_num_seqs: sequences decoded together in one batch.
    scheduling: ``prefill-first`` (prompts waiting for admission are prefilled before the
        running sequences decode again: largest decode batches, best throughput) or
        ``interleave`` (each step decodes the running batch and prefills one chunk beside it:
        steadier per-token latency while long prompts arrive).
    cache_dir: the root of every file kvoffload keeps outside the offload and store directories:
        assembled models (the split Qwen GGUF) and compiled kernels (``kernels/``); default
        ``$KVOFFLOAD_CACHE`` or ``~/.cache/kvoffload`` (kvoffload/paths.py).
    decode_microbatches: the decode batch is split into this many groups whose forwards run in
        threads at once, so that while one group's attention waits on the KV workers (disk reads)
        another computes its projections and MLP (Lamina's rotation). 1 = one forward.
    kv: :class:`KVConfig` (its fields are flags of their own: ``--kv-host-budget`` ...).
    sparse: :class:`SparseConfig` (``--sparse-policy``, ``--sparse-budget`` ...).
    spec: :class:`SpecConfig` (``--speculate``, ``--num-speculative-tokens`` ...).
    store: :class:`StoreConfig` (``--kv-store``, ``--kv-store-budget`` ...).
    """

    model: str | None = cli_field(None, "GGUF file, Hugging Face directory or alias (default: embedded SmolLM2-135M-Instruct)", short="-m")
    device: str = cli_field("auto", "auto, cpu, cuda or cuda:N")
    dtype: str = cli_field(AUTO, "compute dtype", choices=(AUTO, *DTYPES))
    quantization: str = cli_field(AUTO, "weight-only quantisation of linear layers for decode (CPU only)", choices=(AUTO, *QUANTIZATIONS), short="-q")
    quant_max_rows: int = cli_field(8, "PyTorch path: rows up to which the packed kernels are used (more: dense GEMM)")
    decode_kernel: str = cli_field("native", "few-row forwards with quantised weights: fused native layer kernels or the PyTorch reference", choices=DECODE_KERNELS)
    kv_dtype: str | None = cli_field(None, "KV cache dtype (default: --dtype); int8 / int4: compressed blocks", choices=KV_NAMES)
    threads: int | None = cli_field(None, "CPU threads (default: physical cores)", short="-t")
    prefill_chunk: int = cli_field(2048, "prompt tokens per prefill step (bounds activation memory)")
    max_num_seqs: int = cli_field(16, "sequences decoded together in one batch")
    scheduling: str = cli_field("prefill-first", "step policy", choices=SCHEDULING)
    decode_microbatches: int = cli_field(1, "decode batch split into this many forwards run together (overlaps KV worker waits with compute)")
    cache_dir: str | None = cli_field(None, "cache for assembled models and compiled kernels (default: $KVOFFLOAD_CACHE or ~/.cache/kvoffload)")
    kv: KVConfig = field(default_factory=KVConfig, metadata={"nested": True})
    sparse: SparseConfig = field(default_factory=SparseConfig, metadata={"nested": True})
    spec: SpecConfig = field(default_factory=SpecConfig, metadata={"nested": True})
    store: StoreConfig = field(default_factory=StoreConfig, metadata={"nested": True})

    def __post_init__(self) -> None:
        check_types(self)
        if self.prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk must be >= 1, got {self.prefill_chunk}")
        if self.decode_microbatches < 1:
            raise ConfigError(f"decode_microbatches must be >= 1, got {self.decode_microbatches}")
        if self.max_num_seqs < 1:
            raise ConfigError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.scheduling not in SCHEDULING:
            raise ConfigError(f"scheduling must be one of {', '.join(SCHEDULING)}, got {self.scheduling!r}")
        if self.threads is not None and self.threads < 1:
            raise ConfigError(f"threads must be >= 1, got {self.threads}")
        if self.dtype not in (AUTO, *DTYPES):
            raise ConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}, got {self.dtype!r}")
        if self.kv_dtype is not None and self.kv_dtype not in KV_NAMES:
            raise ConfigError(f"kv_dtype must be one of {', '.join(KV_NAMES)}, got {self.kv_dtype!r}")
        if self.kv.kv_group_size and self.kv_dtype not in QUANT:
            raise ConfigError("--kv-group-size applies to a compressed KV (--kv-dtype int8 or int4)")
        if self.quantization not in (AUTO, *QUANTIZATIONS):
            raise ConfigError(f"quantization must be one of auto, {', '.join(QUANTIZATIONS)}, got {self.quantization!r}")
        if self.spec.enabled and self.sparse.enabled:
            raise ConfigError("--speculate self verifies with full attention; choose the draft's sparse policy with "
                              "--spec-draft-policy instead of --sparse-policy")

    def replace(self, **changes: Any) -> EngineConfig:
        """Fields of this class or of a nested one (:class:`KVConfig`, :class:`SparseConfig`,
        :class:`SpecConfig`), routed into it."""
        for f in dataclasses.fields(self):
            if not f.metadata.get("nested"):
                continue
            names = {g.name for g in dataclasses.fields(getattr(self, f.name))}
            sub = {k: changes.pop(k) for k in list(changes) if k in names}
            if sub:
                changes[f.name] = dataclasses.replace(changes.get(f.name, getattr(self, f.name)), **sub)
        return dataclasses.replace(self, **changes)

    @staticmethod
    def field_names() -> set[str]:
        """Every name :meth:`replace` and ``LLM(**kw)`` accept."""
        return set(_engine_fields())


# --------------------------------------------------------------------------- sampling

MAX_LOGPROBS = 20         # OpenAI's limit on top_logprobs

@dataclass(frozen=True)
class SamplingParams:
    """How tokens are drawn for one request.

    temperature: 0 = greedy; otherwise logits are divided by it.
    top_k: keep the k most likely tokens (0 = all).
    top_p: keep the smallest set whose probability reaches p (1 = all).
    seed: per-request RNG seed (``None`` = nondeterministic).
    max_tokens: tokens to generate at most.
    stop: strings that end generation (not included in the output).
    ignore_eos: keep going past end-of-sequence tokens (benchmarks).
    presence_penalty, frequency_penalty: OpenAI's: every token already generated has its logit
        lowered by ``presence_penalty`` once and by ``frequency_penalty`` per occurrence
        (in [-2, 2]; 0 = off; the prompt does not count, as in vLLM).
    repeat_penalty, repeat_last_n: llama.cpp's: a token among the last ``repeat_last_n`` tokens
        (prompt and output) has a positive logit divided by ``repeat_penalty``, a negative one
        multiplied by it (1 = off; HF's ``repetition_penalty`` over a window).
    logprobs: with each generated token, the log-probabilities (of the model's raw distribution)
        of this many most likely tokens besides the chosen one's (``None`` = none; 0 = the
        chosen token's only).
    prompt_logprobs: the same for every prompt token (what an OpenAI ``echo`` + ``logprobs``
        request scores), computed in the prompt's prefill.
    """

    temperature: float = cli_field(0.0, "0 = greedy", flag="--temperature", short="--temp")
    top_k: int = cli_field(0, "top-k sampling (0 = off)")
    top_p: float = cli_field(1.0, "nucleus sampling (1 = off)")
    seed: int | None = cli_field(None, "RNG seed for sampling")
    max_tokens: int = cli_field(128, "tokens to generate at most", short="-n")
    stop: tuple[str, ...] = cli_field((), "stop string (repeatable)")
    ignore_eos: bool = cli_field(False, "do not stop at end-of-sequence tokens")
    presence_penalty: float = cli_field(0.0, "lower the logit of every token already generated by this (OpenAI's; 0 = off)")
    frequency_penalty: float = cli_field(0.0, "lower a generated token's logit by this per occurrence (OpenAI's; 0 = off)")
    repeat_penalty: float = cli_field(1.0, "llama.cpp's repeat penalty over the last --repeat-last-n tokens (1 = off)")
    repeat_last_n: int = cli_field(64, "tokens (prompt and output) the repeat penalty looks back over")
    logprobs: int | None = None
    prompt_logprobs: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        elif isinstance(self.stop, list):
            object.__setattr__(self, "stop", tuple(self.stop))
        check_types(self)
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ConfigError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ConfigError(f"top_k must be >= 0, got {self.top_k}")
        if not (0 < self.top_p <= 1):
            raise ConfigError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ConfigError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if any(not s for s in self.stop):
            raise ConfigError("stop strings must be non-empty")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise ConfigError(f"{name} must be in [-2, 2], got {getattr(self, name)}")
        if not (0 < self.repeat_penalty and math.isfinite(self.repeat_penalty)):
            raise ConfigError(f"repeat_penalty must be a finite number > 0, got {self.repeat_penalty}")
        if self.repeat_last_n < 0:
            raise ConfigError(f"repeat_last_n must be >= 0, got {self.repeat_last_n}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and not 0 <= value <= MAX_LOGPROBS:
                raise ConfigError(f"{name} must be in 0..{MAX_LOGPROBS}, got {value}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalized(self) -> bool:
        return bool(self.presence_penalty or self.frequency_penalty
                    or (self.repeat_penalty != 1.0 and self.repeat_last_n))


# --------------------------------------------------------------------------- server

@dataclass(frozen=True)
class ServeConfig:
    """``kvoffload serve``: the HTTP side (the engine's flags are :class:`EngineConfig`'s).

    host, port: where to listen (loopback by default: nothing outside this machine reaches it
        unless asked; port 0 = any free port).
    api_key: when set, ``/v1/*`` requests must carry ``Authorization: Bearer KEY`` (compared in
        constant time); default ``$KVOFFLOAD_API_KEY`` (a flag's value shows in ``ps``).
    served_model_name: the model's id in the API (default: the checkpoint's file or directory name).
    max_queue: requests waiting for a place in the running batch (``--max-num-seqs``) beyond it;
        past this a request is answered 429 at once.
    request_timeout: seconds a request may run from its arrival (queued time included); then it
        is cancelled, its KV freed, and answered 504 (or its stream ends with an error).
    max_body_bytes: request bodies larger than this are answered 413 unread.
    shutdown_timeout: on SIGTERM / Ctrl-C, seconds in-flight requests get to finish before the
        server stops anyway (then the KV store's workers and offload files are removed).
    """

    host: str = cli_field("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = cli_field(8000, "TCP port (0: any free port)")
    api_key: str | None = cli_field(None, "require 'Authorization: Bearer KEY' on /v1 requests (default: $KVOFFLOAD_API_KEY, else none)")
    served_model_name: str | None = cli_field(None, "the model's id in the API (default: the checkpoint's name)")
    max_queue: int = cli_field(64, "requests queued beyond the running batch before new ones get 429")
    request_timeout: float = cli_field(600.0, "seconds a request may take, queueing included (then 504)")
    max_body_bytes: int = cli_field(8 << 20, "largest request body accepted (413 above)", parse=parse_size)
    shutdown_timeout: float = cli_field(30.0, "seconds in-flight requests get to finish on SIGTERM")

    def __post_init__(self) -> None:
        object.__setattr__(self, "max_body_bytes", parse_size(self.max_body_bytes))
        check_types(self)
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port must be in 0..65535, got {self.port}")
        if self.max_queue < 0:
            raise ConfigError(f"max_queue must be >= 0, got {self.max_queue}")
        for name in ("request_timeout", "shutdown_timeout"):
            if not (getattr(self, name) > 0 and math.isfinite(getattr(self, name))):
                raise ConfigError(f"{name} must be a number of seconds > 0, got {getattr(self, name)}")
        if self.max_body_bytes is None or self.max_body_bytes < 1024:
            raise ConfigError("max_body_bytes must be a size of at least 1KiB")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("api_key must not be empty")


# --------------------------------------------------------------------------- FIELD=VALUE text

def _engine_fields() -> dict[str, tuple[Any, dataclasses.Field]]:
    """Field name -> (type, field) of :class:`EngineConfig`, nested dataclasses flattened."""
    import typing

    def walk(cls: type) -> dict[str, tuple[Any, dataclasses.Field]]:
        hints, out = typing.get_type_hints(cls), {}
        for f in dataclasses.fields(cls):
            tp = hints[f.name]
            out.update(walk(tp) if dataclasses.is_dataclass(tp) else {f.name: (tp, f)})
        return out

    return walk(EngineConfig)


def parse_overrides(items: tuple[str, ...] | list[str], what: str) -> dict[str, Any]:
    """``("sparse_policy=quest", "kv_host_budget=64MiB")`` -> engine field values (``what``
    names the flag in errors). Fields with their own parser take the text, as on the CLI."""
    import typing

    fields = _engine_fields()
    out: dict[str, Any] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip().replace("-", "_"), value.strip()
        if not sep or name not in fields:
            raise ConfigError(f"{what} {item!r}: expected FIELD=VALUE with FIELD one of {', '.join(fields)}")
        tp, f = fields[name]
        if f.metadata.get("parse"):
            out[name] = value
            continue
        if value.lower() == "none" and type(None) in typing.get_args(tp):
            out[name] = None
            continue
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        base = args[0] if args else tp
        try:
            if base is bool:
                if value.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(value)
                out[name] = value.lower() in ("true", "1")
            else:
                out[name] = base(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{what} {name}={value}: not a valid {getattr(base, '__name__', base)}") from None
    return out
