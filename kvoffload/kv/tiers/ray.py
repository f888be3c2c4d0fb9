"""The ray tier: KV shards owned by Ray actors on a cluster's nodes, each attending its own blocks
(Lamina's disaggregated attention: the model runs here, attention runs where the KV lives).

``--kv-tiers host:8GiB,ray:256GiB --ray-address HEAD:6379`` starts ``--ray-shards`` actors
(kv/tiers/ray_worker.py) in one placement group with the ``SPREAD`` strategy, so they land on
different nodes; each bundle reserves ``--ray-shard-cpus`` CPUs and its share of the tier's
budget as Ray's ``memory`` resource. Chunk ``c`` lives in shard ``c % W`` (kv/tiers/shards.py,
as on the disk tier). Whole blocks are sent to their actor when placed; during decode only the
queries of the batch rows that have chunks on a shard and the lists of its chunks go out, and
only (o, lse) comes back — per batch row when the actor merges its chunks (the default), per
chunk with ``--ray-exact`` (then bit-identical to the all-in-memory run).

Faults: every remote call has a deadline (``--ray-timeout``). Each block sent to a shard is
first appended to that shard's *journal*, a private file in this machine's offload directory
(the driver's disk keeps a copy it never reads in decode). An actor that dies, misses the
deadline or loses its node is killed and started again in its bundle of the placement group
(Ray moves the bundles of a node that left to live nodes), its shard is rebuilt by replaying
its journal, and the request in flight is sent again: the output is unchanged. A shard that
cannot be placed again within the deadline ends the run with a one-line error naming the node
it was on.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import weakref
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from kvoffload.dtypes import storage_torch_dtype
from kvoffload.errors import ConfigError, KvoffloadError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk import MAX_RESTARTS, make_offload_dir
from kvoffload.kv.tiers.disk_worker import WorkerIO
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    AttendResult,
    PooledChunks,
    TierContext,
    TierSpec,
)
from kvoffload.kv.tiers.ray_worker import ShardServer
from kvoffload.kv.tiers.shards import as_runs, request_bytes, shard_of, split_request

INSTALL = 'pip install "kvoffload[ray]"'
REPLAY_BYTES = 32 << 20          # journal bytes replayed to a new actor per round trip


class RayShardError(KvoffloadError):
    """A ray shard failed for a reason a restart cannot fix, or could not be placed again
    (the message names the shard's node)."""


class _Lost(Exception):
    """An actor that died, lost its node or missed the deadline (the caller replaces it)."""


def import_ray():
    """The ``ray`` module, or a one-line error naming the install step."""
    try:
        import ray
    except ImportError:
        raise ConfigError(f"the ray KV tier needs Ray, which is not installed here: {INSTALL}") from None
    return ray


def _check_reachable(address: str, timeout: float) -> None:
    """A TCP connection to ``HOST:PORT`` within a few seconds, else a one-line error (Ray's own
    client retries an unreachable head for a long time)."""
    host, sep, port = address.split("://")[-1].rpartition(":")
    try:
        if not sep or not host:
            raise ValueError
        port_n = int(port)
    except ValueError:
        raise ConfigError(f"bad --ray-address {address!r} (expected HOST:PORT of a Ray head, or auto)") from None
    try:
        socket.create_connection((host.strip("[]"), port_n), timeout=min(timeout, 5.0)).close()
    except OSError as e:
        why = e.strerror or str(e) or type(e).__name__
        raise ConfigError(f"cannot reach a Ray cluster at {address}: {why} (start one with `ray start --head`, "
                          f"or check --ray-address)") from None


def check_ray(address: str | None, timeout: float) -> None:
    """Ray is installed and a ``HOST:PORT`` address answers (a one-line error otherwise; run
    before the model loads)."""
    import_ray()
    if address not in (None, "auto"):
        _check_reachable(address, timeout)


def connect(address: str | None, timeout: float):
    """Ray, connected to ``address`` (``auto``; ``None``: ``RAY_ADDRESS`` or a new local
    instance); a process already connected keeps its connection."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    if address not in (None, "auto"):
        _check_reachable(address, timeout)
    kw: dict = dict(address=address, log_to_driver=False, logging_level=logging.ERROR)
    if address is None and not os.environ.get("RAY_ADDRESS"):
        kw["include_dashboard"] = False
    try:
        ray.init(**kw)
    except Exception as e:              # noqa: BLE001 - Ray raises many kinds; the user needs one line
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ConfigError(f"cannot connect to the Ray cluster at {address or 'RAY_ADDRESS / a new local instance'}: "
                          f"{first}") from None
    return ray


class Journal:
    """Every block written to one shard, appended to a private file (0600): a replacement actor
    is rebuilt from it. Per shard slot, the offset of its latest bytes (a slot written again —
    its chunk freed and reused — replays only its latest)."""

    def __init__(self, path: str, slot_bytes: int) -> None:
        self.path, self.sb = path, slot_bytes
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        self.end = 0
        self.at = np.zeros(0, np.int64)                           # shard slot -> offset + 1 (0: never written)
        self.records: list[tuple[int, np.ndarray]] = []           # (offset, slots) of each append

    def append(self, slots: np.ndarray, raw: np.ndarray) -> None:
        """``raw`` ``[n, slot_bytes]`` uint8, the bytes of ``slots``."""
        try:
            n = os.pwrite(self.fd, memoryview(np.ascontiguousarray(raw)).cast("B"), self.end)
        except OSError as e:
            raise RayShardError(f"cannot write the ray tier's journal {self.path}: {e.strerror}") from None
        if n != raw.nbytes:
            raise RayShardError(f"the ray tier's journal {self.path}: disk full (short write)")
        if len(slots) and int(slots.max()) >= len(self.at):
            grow = max(int(slots.max()) + 1, 2 * len(self.at)) - len(self.at)
            self.at = np.concatenate([self.at, np.zeros(grow, np.int64)])
        self.at[slots] = self.end + 1 + np.arange(len(slots), dtype=np.int64) * self.sb
        self.records.append((self.end, slots))
        self.end += n

    def replay(self):
        """Yield (slots, ``[n, slot_bytes]`` uint8) of every slot's latest bytes, in write order."""
        for off, slots in self.records:
            live = self.at[slots] == off + 1 + np.arange(len(slots), dtype=np.int64) * self.sb
            if live.any():
                raw = np.frombuffer(os.pread(self.fd, len(slots) * self.sb, off), np.uint8).reshape(len(slots), self.sb)
                yield slots[live], raw[live]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


@dataclass
class _Shard:
    """The driver's handle on one actor: where it runs, its writes not yet acknowledged, the
    request in flight."""

    index: int
    actor: object
    info: dict
    journal: Journal
    writes: list = field(default_factory=list)                    # (ref, bytes) not yet acknowledged
    backlog: int = 0
    restarts: int = 0

    @property
    def node(self) -> str:
        node = self.info.get("node", "")
        return f"{self.info.get('ip', '?')}" + (f" (node {node[:12]})" if node else "")


def _cleanup(ray, shards: list[_Shard], pg_box: list, directory: str) -> None:
    """Close the actors (a disk shard removes its file), remove the placement group and the
    journals (also at exit)."""
    try:
        if ray.is_initialized():
            refs = [s.actor.close.remote() for s in shards]
            ray.wait(refs, num_returns=len(refs), timeout=5)
            for s in shards:
                ray.kill(s.actor, no_restart=True)
            if pg_box:
                from ray.util.placement_group import remove_placement_group

                remove_placement_group(pg_box[0])
    except Exception:               # noqa: BLE001 - best effort (the cluster may be gone)
        pass
    for s in shards:
        s.journal.close()
    shutil.rmtree(directory, ignore_errors=True)


class RayTier(PooledChunks):
    """Chunks on Ray actors (``--ray-shards``), each attending its shard where it lives."""

    prefetches = False
    direct = False                  # (its blocks live in other processes)
    resident = fetch = None

    @staticmethod
    def chunk_bytes(layout: BlockLayout) -> int:
        """Bytes one chunk takes of the budget (slots back to back in an actor's RAM)."""
        return layout.chunk_blocks * layout.slot_bytes

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        super().__init__(spec, ctx)
        kv, lay = ctx.kv, ctx.layout
        self.medium = "disk" if kv.ray_storage == "disk" else "memory"
        self.timeout, self.merge, self.max_backlog = kv.ray_timeout, not kv.ray_exact, kv.disk_write_backlog
        self.ray = ray = connect(kv.ray_address, kv.ray_timeout)
        W = kv.ray_shards
        self.per_actor = None if self.capacity is None else -(-self.capacity // W) * self.chunk_bytes(lay)
        self.bundle = {"CPU": kv.ray_shard_cpus} | ({"memory": self.per_actor} if self.per_actor else {})
        self.directory = make_offload_dir(kv.offload_dir, None)
        self.shards: list[_Shard] = []
        self._pg: list = []
        self._finalizer = weakref.finalize(self, _cleanup, ray, self.shards, self._pg, self.directory)
        seg = max(lay.chunk_blocks, kv.arena_segment_slots // lay.chunk_blocks * lay.chunk_blocks)
        io = WorkerIO(kv.disk_read_batch, 0, kv.disk_read_blocks, kv.disk_io_depth, reader=kv.disk_reader)
        self._args = (asdict(lay), ctx.group, max(1, int(kv.ray_shard_cpus)), kv.ray_storage, seg, asdict(io),
                      ctx.native)
        try:
            self._start(W)
        except BaseException:
            self._finalizer()
            raise
        self._split: tuple | None = None

    # ---- actors ----
    def _start(self, W: int) -> None:
        from ray.util.placement_group import placement_group

        pg = placement_group([dict(self.bundle) for _ in range(W)], strategy="SPREAD", name="")
        self._pg.append(pg)
        try:
            self.ray.get(pg.ready(), timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise ConfigError(f"the Ray cluster cannot place {W} ray KV shards of {self.bundle} within "
                              f"{self.timeout:g} s (--ray-timeout); it has {self._free()} free") from None
        actors = [self._new_actor(i) for i in range(W)]
        infos = self._get_all([a.where.remote() for a in actors], "starting the ray KV shards")
        for i, (a, info) in enumerate(zip(actors, infos)):
            self.shards.append(_Shard(i, a, info, Journal(os.path.join(self.directory, f"journal-{i}.kv"),
                                                          self.ctx.layout.slot_bytes)))

    def _free(self) -> str:
        free = self.ray.available_resources()
        return f"{free.get('CPU', 0):g} CPUs and {free.get('memory', 0) / 2**30:.1f} GiB of memory"

    def _new_actor(self, i: int):
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        cls = _actor_class(self.ray)
        opts = dict(num_cpus=self.bundle["CPU"], max_restarts=0, max_task_retries=0,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self._pg[0], placement_group_bundle_index=i))
        if self.per_actor:
            opts["memory"] = self.per_actor
        return cls.options(**opts).remote(*self._args)

    def _get_all(self, refs: list, what: str) -> list:
        try:
            return self.ray.get(refs, timeout=self.timeout)
        except self.ray.exceptions.GetTimeoutError:
            raise ConfigError(f"{what} took more than {self.timeout:g} s (--ray-timeout); the cluster has "
                              f"{self._free()} free") from None
        except self.ray.exceptions.RayError as e:
            raise ConfigError(f"{what} failed: {_first_line(e)}") from None

    def _get(self, s: _Shard, ref):
        """A shard's reply within the deadline; :class:`_Lost` when it died or missed it."""
        ex = self.ray.exceptions
        try:
            return self.ray.get(ref, timeout=self.timeout)
        except ex.GetTimeoutError:
            raise _Lost(f"no answer within {self.timeout:g} s (--ray-timeout)") from None
        except ex.RayTaskError as e:            # the actor's own error (disk full, ...): not a restart's to fix
            raise RayShardError(f"ray shard {s.index} on {s.node}: {_first_line(e.cause or e)}") from None
        except ex.RayError as e:                # died, node lost, unavailable, object lost
            raise _Lost(_first_line(e)) from None

    def _restart(self, s: _Shard, why: str) -> None:
        """Replace the shard's actor (in its bundle, which Ray moves off a node that left) and
        rebuild its shard from the journal."""
        while True:
            s.restarts += 1
            if s.restarts > MAX_RESTARTS:
                raise RayShardError(f"ray shard {s.index} on {s.node} failed {s.restarts} times; last: {why}")
            try:
                self.ray.kill(s.actor, no_restart=True)
            except Exception:                   # noqa: BLE001 - already gone
                pass
            actor = self._new_actor(s.index)
            try:
                info = self.ray.get(actor.where.remote(), timeout=self.timeout)
            except self.ray.exceptions.GetTimeoutError:
                self.ray.kill(actor, no_restart=True)
                raise RayShardError(f"ray shard {s.index} was lost on {s.node} ({why}) and could not be placed on "
                                    f"another node within {self.timeout:g} s (--ray-timeout; the cluster has "
                                    f"{self._free()} free)") from None
            except self.ray.exceptions.RayError as e:
                why = _first_line(e)
                continue
            s.actor, s.writes, s.backlog = actor, [], 0
            old = s.node
            s.info = info
            try:
                sent, refs = 0, []
                for slots, raw in s.journal.replay():
                    refs.append(actor.write.remote(slots, raw))
                    sent += raw.nbytes
                    if sent >= REPLAY_BYTES:
                        self._get(s, refs)
                        sent, refs = 0, []
                self._get(s, refs)
            except _Lost as e:
                why = str(e)
                continue
            if old != s.node:
                logging.getLogger("kvoffload").info("ray shard %d moved from %s to %s", s.index, old, s.node)
            return

    def _call(self, s: _Shard, method: str, *args):
        """``actor.method(*args)``, the actor replaced and the call sent again if it is lost."""
        while True:
            try:
                return self._get(s, getattr(s.actor, method).remote(*args))
            except _Lost as e:
                self._restart(s, str(e))

    def _drain(self, s: _Shard, wait: bool) -> None:
        """Take the acknowledgements in (all, with ``wait``; else those already in, and the
        oldest until the backlog is under ``max_backlog``)."""
        while s.writes:
            ref, n = s.writes[0]
            if not wait and s.backlog <= self.max_backlog:
                done, _ = self.ray.wait([ref], timeout=0)
                if not done:
                    return
            try:
                self._get(s, ref)
            except _Lost as e:
                self._restart(s, str(e))         # the journal holds every write: nothing pending after
                return
            s.writes.pop(0)
            s.backlog -= n

    def _where(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return shard_of(slots, self.ctx.layout.chunk_blocks, len(self.shards))

    # ---- blocks ----
    def write(self, slots: np.ndarray, data: torch.Tensor) -> None:
        """Journal the blocks, then send them to their actors (acknowledged later)."""
        shard, local = self._where(np.asarray(slots, np.int64))
        raw = data.detach().cpu().contiguous().view(torch.uint8).numpy()        # [n, slot_bytes]
        for w in np.unique(shard):
            s = self.shards[int(w)]
            pick = shard == w
            sl, rw = local[pick], np.ascontiguousarray(raw[pick])
            s.journal.append(sl, rw)
            s.writes.append((s.actor.write.remote(sl, rw), rw.nbytes))
            s.backlog += rw.nbytes
            self._drain(s, wait=False)
        self.counters.written += len(slots) * self.ctx.layout.slot_bytes

    def flush(self) -> None:
        pass                                            # writes are sent when made

    def read(self, slots: np.ndarray) -> torch.Tensor:
        slots = np.asarray(slots, np.int64)
        shard, local = self._where(slots)
        sb = self.ctx.layout.slot_bytes
        out = np.empty((len(slots), sb), np.uint8)
        ws = [int(w) for w in np.unique(shard)]
        refs = {w: self.shards[w].actor.read.remote(local[shard == w]) for w in ws}   # every shard at once
        for w in ws:
            s = self.shards[w]
            try:
                raw = self._get(s, refs[w])
            except _Lost as e:
                self._restart(s, str(e))
                raw = self._call(s, "read", local[shard == w])
            out[shard == w] = raw
        self.counters.read += len(slots) * sb
        return torch.from_numpy(out).view(storage_torch_dtype(self.ctx.layout.dtype)).to(self.ctx.device)

    # ---- attention ----
    def submit(self, req: AttendRequest) -> None:
        """Send each shard the queries of the rows that have chunks there, and those chunks."""
        subs = []
        for w, items, sub in split_request(req, self.ctx.layout.chunk_blocks, len(self.shards)):
            rows = np.unique(sub.seq)                                           # only these rows' queries travel
            runs = as_runs(sub.first, sub.slots)                                # whole chunks: one slot per item
            sub = AttendRequest(sub.layer, np.ascontiguousarray(sub.q[rows]), np.searchsorted(rows, sub.seq),
                                sub.first, None if runs is not None else sub.slots, sub.masks)
            s = self.shards[w]
            subs.append((s, items, (sub, runs), s.actor.attend.remote(sub, self.merge, runs)))
        self._split = (req, subs)

    def prefetch(self, req: AttendRequest) -> None:
        pass

    def collect(self) -> AttendResult:
        req, subs = self._split
        self._split = None
        B, L, H, D = req.q.shape
        N = req.num_items
        o = np.zeros((N, L, H, D), np.float32)
        lse = np.full((N, L, H), -np.inf, np.float32)
        read = sent = back = 0
        for s, items, (sub, runs), ref in subs:
            try:
                first, o_w, lse_w, n_read = self._get(s, ref)
            except _Lost as e:
                self._restart(s, str(e))
                first, o_w, lse_w, n_read = self._call(s, "attend", sub, self.merge, runs)
            at = items if first is None else items[first]      # merged: a row's part sits at its first item
            o[at], lse[at] = o_w, lse_w
            read += n_read
            sent += request_bytes(sub) + (0 if runs is None else runs.nbytes)
            back += o_w.nbytes + lse_w.nbytes + (0 if first is None else first.nbytes)
            self._drain(s, wait=False)
        c = self.counters
        c.attended(read, len(req.slots))
        c.to_worker += sent
        c.from_worker += back
        return AttendResult(torch.from_numpy(o), torch.from_numpy(lse), read, sent, back)

    def sync(self) -> None:
        """Wait until every block sent is acknowledged by its actor."""
        for s in self.shards:
            self._drain(s, wait=True)

    def bytes_held(self) -> int:
        return self.pool.used * self.chunk_bytes(self.ctx.layout)

    def pids(self) -> list[int]:
        return []                                       # the actors' memory is on their nodes

    def nodes(self) -> list[str]:
        """Where each shard's actor runs now."""
        return [s.node for s in self.shards]

    @property
    def restarts(self) -> int:
        return sum(s.restarts for s in self.shards)

    def close(self) -> None:
        """Stop the actors, remove the placement group and the journals (also done at exit)."""
        self._finalizer()


_ACTOR: dict = {}


def _actor_class(ray):
    """``ray.remote(ShardServer)``, made once per connection (job) of this process."""
    job = ray.get_runtime_context().get_job_id()
    if _ACTOR.get("job") != job:
        _ACTOR.update(job=job, cls=ray.remote(ShardServer))
    return _ACTOR["cls"]


def _first_line(e: BaseException) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
