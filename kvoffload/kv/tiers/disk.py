"""The disk tier: chunks in shard files under a fresh ``kvoffload-*`` directory, each shard owned
by a worker process (kv/tiers/disk_worker.py) that computes attention over its blocks.

Chunk ``c`` lives in shard ``c % workers`` (round-robin), at that shard's chunk ``c // workers``:
its blocks are consecutive slots of one file, so a chunk is one read. The main process keeps
the block tables (placement) and every write a worker has not acknowledged, so a worker that
dies is restarted from its file and its unacknowledged writes and the request in flight are
replayed: the output is unchanged.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection

import numpy as np
import torch

import kvoffload
from kvoffload.dtypes import torch_dtype
from kvoffload.errors import ConfigError, KvoffloadError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk_worker import WorkerIO, WriteBlocks
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    AttendResult,
    ChunkPool,
    TierContext,
    TierCounters,
    TierSpec,
    chunk_capacity,
)

MAX_RESTARTS = 3


class WorkerError(KvoffloadError):
    """A disk worker failed for a reason a restart cannot fix (message says which)."""


def _worker_env() -> dict[str, str]:
    """A worker's environment: ours, with this kvoffload's parent directory first on its path."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(kvoffload.__file__)))
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


class ProcessWorker:
    """The main process's handle on one disk worker process (requests over a socket pair; one
    request — an attend or a read — in flight at a time, writes streamed beside it)."""

    def __init__(self, path: str, layout: BlockLayout, group: int, threads: int, io: WorkerIO,
                 max_backlog: int = 32 << 20, native: bool = True) -> None:
        self.path, self.layout, self.group, self.threads = path, layout, group, threads
        self.io, self.max_backlog, self.native = io, max_backlog, native
        self.backlog = 0                            # bytes in unacknowledged writes
        self.unacked: list[WriteBlocks] = []        # sent, not yet acknowledged: replayed after a restart
        self.request: tuple[str, object] | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        # A fresh interpreter (not fork: the parent runs OpenMP threads; not multiprocessing's
        # spawn: that re-imports the user's __main__), talking over a socket pair. -P: the
        # working directory is not put on sys.path (no code from it is imported); the worker
        # imports the same kvoffload as this process, wherever that was imported from.
        mine, theirs = socket.socketpair()
        cmd = [sys.executable, "-P", "-m", "kvoffload.kv.tiers.disk_worker", "--fd", str(theirs.fileno()),
               "--path", self.path, "--layout", json.dumps(asdict(self.layout)), "--group", str(self.group),
               "--threads", str(self.threads), "--io", json.dumps(asdict(self.io))] \
            + ([] if self.native else ["--no-native"])
        # own session: a terminal Ctrl-C reaches only the main process, which closes the workers
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                     start_new_session=True, env=_worker_env())
        theirs.close()
        self.conn = Connection(mine.detach())
        try:
            status, info = self._recv()
        except ConnectionError:
            raise WorkerError(f"disk worker for {self.path} exited while starting") from None
        if status != "ok":
            raise WorkerError(info)
        self.pid = info

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _recv(self):
        try:
            return self.conn.recv()
        except (EOFError, OSError) as e:
            raise ConnectionError("disk worker died") from e

    def _send(self, msg) -> None:
        try:
            self.conn.send(msg)
        except (BrokenPipeError, OSError):
            pass                                    # noticed when a reply is due, which restarts the worker

    def write(self, w: WriteBlocks) -> None:
        """Send whole blocks; their bytes stay here until the worker acknowledges them (for a
        replay after a restart). Acks already in are taken now; past ``max_backlog`` bytes this
        waits for them (back-pressure: the disk, not RAM, absorbs a long prefill)."""
        self.unacked.append(w)
        self.backlog += len(w.data)
        self._send(("write", w))
        if self.request is not None:                # replies are in order: a request's reply is due first
            return
        while self.unacked and (self.backlog > self.max_backlog or self.conn.poll(0)):
            try:
                self._check(self._recv())
            except ConnectionError:
                self._restart()
                continue
            self.backlog -= len(self.unacked.pop(0).data)

    def submit(self, op: str, payload) -> None:
        """Start an ``attend`` (an :class:`AttendRequest`) or a ``read`` (slots)."""
        if self.request is not None:
            raise RuntimeError("a disk worker request is already in flight")
        self.request = (op, payload)
        self._send((op, payload))

    def prefetch(self, req: AttendRequest) -> None:
        """Hint: the next request's items (read ahead; lost harmlessly on a restart)."""
        self._send(("prefetch", req))

    def collect(self):
        """The in-flight request's reply (after the acknowledgements due before it)."""
        while True:
            try:
                while self.unacked:
                    self._check(self._recv())
                    self.backlog -= len(self.unacked.pop(0).data)
                result = self._check(self._recv()) if self.request is not None else None
                self.request = None
                return result
            except ConnectionError:
                self._restart()

    def sync(self) -> None:
        """Wait until every write sent so far is on the shard (no request may be in flight)."""
        if self.request is not None:
            raise RuntimeError("sync() while a request is in flight")
        self.collect()

    def _check(self, msg):
        status, payload = msg
        if status != "ok":
            raise WorkerError(payload)
        return payload

    def _restart(self) -> None:
        self.restarts += 1
        if self.restarts > MAX_RESTARTS:
            raise WorkerError(f"disk worker for {self.path} died {self.restarts} times")
        if self.alive:
            self.proc.kill()
        self.proc.wait()
        self.conn.close()
        self._start()
        for w in self.unacked:                      # replay, then the request in flight
            self._send(("write", w))
        if self.request is not None:
            self._send(self.request)

    def close(self) -> None:
        if self.alive:
            self._send(("close", None))
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        if self.alive:
            self.proc.kill()
            self.proc.wait()
        self.conn.close()


class LocalWorker:
    """A disk shard read and attended by this process (``--disk-workers 0``): the same reads
    (O_DIRECT, coalesced, many in flight on reader threads) and the same kernel as a worker
    process, without the process hop. On a host with few cores that hop costs more than a
    sparse layer's reads (waking a worker competes with the model's own threads), so the
    near-data worker loses to reading the chosen blocks here. Writes are made at once (the
    file is the only copy); an attend's first reads start at :meth:`submit` and the blocks
    are attended at :meth:`collect`, after the faster tiers."""

    restarts = 0
    alive = True

    def __init__(self, path: str, layout: BlockLayout, group: int, threads: int, io: WorkerIO,
                 native: bool = True) -> None:
        from kvoffload.kv.tiers.disk_worker import DiskIOError, DiskWorkerServer

        try:
            self.server = DiskWorkerServer(path, layout, group, threads, io, native)
        except DiskIOError as e:
            raise WorkerError(str(e)) from None
        self.request: tuple[str, object] | None = None
        self.hint: AttendRequest | None = None     # a prefetch given while a request was in flight

    def write(self, w: WriteBlocks) -> None:
        self.server.write(w)

    def submit(self, op: str, payload) -> None:
        if self.request is not None:
            raise RuntimeError("a disk request is already in flight")
        if op == "attend":
            self.server.begin(payload)
        self.request = (op, payload)

    def prefetch(self, req: AttendRequest) -> None:
        if self.request is None:
            self.server.prefetch(req)
        else:                                       # the attend in flight may use the read-ahead buffer
            self.hint = req

    def collect(self):
        if self.request is None:
            return None
        (op, payload), self.request = self.request, None
        out = self.server.finish() if op == "attend" else self.server.read(payload)
        if self.hint is not None:
            self.server.prefetch(self.hint)
            self.hint = None
        return out

    def sync(self) -> None:
        pass                                        # writes are made when sent

    def close(self) -> None:
        self.server.close()


def _cleanup(workers: list[ProcessWorker], directory: str) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:           # noqa: BLE001 - best effort at exit
            pass
    shutil.rmtree(directory, ignore_errors=True)


def make_offload_dir(base: str | None, budget: int | None) -> str:
    """A fresh private ``kvoffload-*`` directory inside ``base`` (default: the system temp dir)."""
    base = base or tempfile.gettempdir()
    if not os.path.isdir(base):
        raise ConfigError(f"offload directory {base} does not exist")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"offload directory {base} is not writable")
    free = shutil.disk_usage(base).free
    if budget is not None and budget > free:
        raise ConfigError(f"the disk tier's budget of {budget} bytes exceeds the {free} bytes free in {base}")
    try:
        return tempfile.mkdtemp(prefix="kvoffload-", dir=base)
    except OSError as e:
        raise ConfigError(f"cannot create a directory in {base}: {e.strerror}") from None


class DiskTier:
    """Shard files under ``--offload-dir``, one worker process each (``--disk-workers``)."""

    medium = "disk"
    prefetches = True

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        lay, kv = ctx.layout, ctx.kv
        self.name, self.budget, self.ctx = spec.name, spec.budget, ctx
        self.capacity = chunk_capacity(spec, lay.chunk_blocks * lay.disk_stride)
        self.pool = ChunkPool(self.capacity)
        self.counters = TierCounters()
        self.directory = make_offload_dir(kv.offload_dir, spec.budget)
        self.workers: list[ProcessWorker] = []
        self._finalizer = weakref.finalize(self, _cleanup, self.workers, self.directory)
        # the disks bound these workers: their kernels share the cores (OpenMP teams that
        # outnumber the cores stall each other at every barrier)
        per_worker = max(1, ctx.threads // max(1, kv.disk_workers))
        io = WorkerIO(kv.disk_read_batch, kv.disk_read_ahead, kv.disk_read_blocks, kv.disk_io_depth,
                      reader=kv.disk_reader)
        if kv.disk_workers == 0:                    # one shard, read and attended in this process
            self.workers.append(LocalWorker(os.path.join(self.directory, "shard-0.kv"), lay, ctx.group,
                                            ctx.threads, io, ctx.native))
        for i in range(kv.disk_workers):
            self.workers.append(ProcessWorker(os.path.join(self.directory, f"shard-{i}.kv"), lay, ctx.group,
                                              per_worker, io, kv.disk_write_backlog, ctx.native))
        self._writes: dict[int, list[tuple[np.ndarray, bytes]]] = {}
        self._split: list[tuple[int, np.ndarray]] | None = None      # the request in flight, per shard

    # ---- chunks ----
    def has_room(self) -> bool:
        return self.pool.has_room()

    def alloc(self) -> int:
        return self.pool.alloc()

    def release(self, chunk: int) -> None:
        self.pool.release(chunk)

    @property
    def used(self) -> int:
        return self.pool.used

    def _where(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tier slots -> (shard, the shard's slot)."""
        CB, W = self.ctx.layout.chunk_blocks, len(self.workers)
        chunk, i = np.divmod(slots, CB)
        return chunk % W, (chunk // W) * CB + i

    # ---- blocks ----
    def write(self, slots: np.ndarray, data: torch.Tensor) -> None:
        shard, local = self._where(np.asarray(slots, np.int64))
        raw = data.detach().cpu().contiguous().view(torch.uint8).numpy()        # [n, slot_bytes]
        for w in np.unique(shard):
            pick = shard == w
            self._writes.setdefault(int(w), []).append((local[pick], raw[pick].tobytes()))
        self.counters.written += len(slots) * self.ctx.layout.slot_bytes

    def flush(self) -> None:
        """Hand the batched whole blocks to their workers (they write while we compute)."""
        for w, items in self._writes.items():
            self.workers[w].write(WriteBlocks(np.concatenate([s for s, _ in items]), b"".join(d for _, d in items)))
        self._writes.clear()

    def read(self, slots: np.ndarray) -> torch.Tensor:
        self.flush()
        slots = np.asarray(slots, np.int64)
        shard, local = self._where(slots)
        sb = self.ctx.layout.slot_bytes
        out = np.empty((len(slots), sb), np.uint8)
        ws = [int(w) for w in np.unique(shard)]
        for w in ws:                                    # every shard reads at once
            self.workers[w].submit("read", local[shard == w])
        for w in ws:
            raw = self.workers[w].collect()
            out[shard == w] = np.frombuffer(raw, np.uint8).reshape(-1, sb)
        self.counters.read += len(slots) * sb
        return torch.from_numpy(out).view(torch_dtype(self.ctx.layout.dtype)).to(self.ctx.device)

    # ---- attention ----
    def _per_shard(self, req: AttendRequest) -> list[tuple[int, np.ndarray, AttendRequest]]:
        """The request cut by shard: (worker, the items it gets, its request)."""
        if req.num_items == 0:
            return []
        shard, local = self._where(req.slots)
        item_shard = shard[req.first[:-1]]                   # a chunk's blocks are all in one shard
        out = []
        for w in np.unique(item_shard):
            items = np.nonzero(item_shard == w)[0]
            counts = req.first[items + 1] - req.first[items]
            first = np.zeros(len(items) + 1, np.int64)
            np.cumsum(counts, out=first[1:])
            blocks = np.concatenate([np.arange(req.first[i], req.first[i + 1]) for i in items])
            q = req.q.numpy() if isinstance(req.q, torch.Tensor) else req.q
            sub = AttendRequest(req.layer, q, req.seq[items], first, local[blocks],
                                None if req.masks is None else req.masks[blocks])
            out.append((int(w), items, sub))
        return out

    def submit(self, req: AttendRequest) -> None:
        split = self._per_shard(req)
        self.flush()
        for w, _, sub in split:
            self.workers[w].submit("attend", sub)
        self._split = (req, split)

    def prefetch(self, req: AttendRequest) -> None:
        for w, _, sub in self._per_shard(req):
            self.workers[w].prefetch(sub)

    def collect(self) -> AttendResult:
        req, split = self._split
        self._split = None
        B, L, H, D = req.q.shape
        N = req.num_items
        o = np.zeros((N, L, H, D), np.float32)
        lse = np.full((N, L, H), -np.inf, np.float32)
        read = sent = back = ahead = 0
        for w, items, sub in split:
            r: AttendResult = self.workers[w].collect()
            o[items], lse[items] = r.o, r.lse
            read += r.bytes_read
            ahead += r.ahead
            sent += sub.q.nbytes + sub.slots.nbytes + sub.first.nbytes + (0 if sub.masks is None else sub.masks.nbytes)
            back += r.o.nbytes + r.lse.nbytes
        c = self.counters
        c.read += read
        c.to_worker += sent
        c.from_worker += back
        c.blocks += len(req.slots)
        c.ahead += ahead
        return AttendResult(torch.from_numpy(o), torch.from_numpy(lse), read, sent, back, ahead)

    def bytes_held(self) -> int:
        return self.pool.used * self.ctx.layout.chunk_blocks * self.ctx.layout.disk_stride

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self.workers if isinstance(w, ProcessWorker)]

    @property
    def restarts(self) -> int:
        return sum(w.restarts for w in self.workers)

    def close(self) -> None:
        """Stop the workers and remove the offload directory (also done at exit)."""
        self._finalizer()
