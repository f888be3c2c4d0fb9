"""Disk workers: separate processes, each owning one shard file of the disk tier — the emulated
computational-storage engine of InstInfer. A request brings the queries; the worker reads its
blocks (aligned, O_DIRECT) in batches, attends over each batch while the next is being read,
and sends back only the partial output and its log-sum-exp.

The process imports numpy and the native kernel, never torch. Its state is its file: the
main process keeps the block tables and every write that the worker has not acknowledged, so
a worker that dies is restarted from its file and the lost request replayed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict
from multiprocessing.connection import Connection

import numpy as np

from kvoffload.attention.merge import merge_np
from kvoffload.attention.workers.protocol import (
    AttendRequest,
    AttendResult,
    WriteBlocks,
)
from kvoffload.errors import KvoffloadError
from kvoffload.kernels.paged import (
    MAX_QUERY_ROWS,
    BlockLists,
    PagedAttention,
    masks_to_valid,
)
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk import DiskIOError, DiskShard, aligned_buffer

_NP = {"float32": np.float32, "bfloat16": np.uint16, "float16": np.float16}
MAX_RESTARTS = 3
IO_DEPTH = 2             # concurrent reads per worker
IO_BYTES = 1 << 20       # bytes per read


class WorkerError(KvoffloadError):
    """A disk worker failed for a reason a restart cannot fix (message says which)."""


def to_f32(a: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


def attend_multi_np(q: np.ndarray, k: np.ndarray, v: np.ndarray, valid: np.ndarray | None = None,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """q ``[L, H, D]`` fp32 over k, v ``[H_kv, T, D]`` fp32 -> o ``[L, H, D]``, lse ``[L, H]``;
    ``valid`` ``[H_kv, T]`` bool: the keys each head sees (sparse decode; default all). One KV
    head at a time, softmax in place: the scores of one head are the only big array."""
    L, H, D = q.shape
    H_kv = k.shape[0]
    G = H // H_kv
    qg = q.reshape(L, H_kv, G, D).transpose(1, 2, 0, 3).reshape(H_kv, G * L, D) * np.float32(1.0 / np.sqrt(D))
    o = np.empty((H_kv, G * L, D), np.float32)
    lse = np.empty((H_kv, G * L), np.float32)
    for h in range(H_kv):
        s = qg[h] @ k[h].T                                                      # [G*L, T]
        if valid is not None:
            s[:, ~valid[h]] = -np.inf
        m = np.maximum(s.max(1, keepdims=True), np.float32(-3e38))        # a head with no key: o = 0, lse = -inf
        np.subtract(s, m, out=s)
        np.exp(s, out=s)
        lsum = s.sum(1, keepdims=True)
        np.divide(s @ v[h], np.maximum(lsum, np.float32(1e-38)), out=o[h])      # [G*L, D]
        with np.errstate(divide="ignore"):
            lse[h] = (m + np.log(lsum))[:, 0]
    o = o.reshape(H_kv, G, L, D).transpose(2, 0, 1, 3).reshape(L, H, D)
    return o, lse.reshape(H_kv, G, L).transpose(2, 0, 1).reshape(L, H)


class DiskWorkerServer:
    """What runs inside the worker process (also callable in-process, for tests)."""

    def __init__(self, path: str, layout: BlockLayout, threads: int, batch_bytes: int,
                 ahead_bytes: int = 0, io_depth: int = IO_DEPTH, io_bytes: int = IO_BYTES) -> None:
        self.shard, self.layout, self.threads = DiskShard(path, layout), layout, threads
        self.batch_slots = max(1, batch_bytes // layout.disk_stride)
        self.bufs = [aligned_buffer(self.batch_slots * layout.disk_stride) for _ in range(2)]
        self.ahead_slots = ahead_bytes // layout.disk_stride
        self.ahead_buf = aligned_buffer(self.ahead_slots * layout.disk_stride) if self.ahead_slots else None
        self.ahead: tuple[np.ndarray, list[Future]] | None = None     # slots being read ahead
        self.wbuf = aligned_buffer(self.batch_slots * layout.disk_stride)
        self.kernels: dict[int, PagedAttention] = {}
        self.io = ThreadPoolExecutor(io_depth, thread_name_prefix="kv-read")
        self.io_bytes = io_bytes

    def write(self, w: WriteBlocks) -> None:
        slots = np.asarray(w.slots, dtype=np.int64)
        data = memoryview(w.data)
        for i in range(0, len(slots), self.batch_slots):       # bounded staging buffer
            j = min(i + self.batch_slots, len(slots))
            self.shard.write(slots[i:j], data[i * self.layout.slot_bytes:j * self.layout.slot_bytes], self.wbuf)

    def read(self, slots: np.ndarray) -> bytes:
        """The raw bytes of ``slots`` (any order, repeats allowed), ``slot_bytes`` each, in that
        order (a draft cache filled from the disk tier)."""
        slots = np.asarray(slots, dtype=np.int64)
        uniq, inv = np.unique(slots, return_inverse=True)
        st, sb = self.layout.disk_stride, self.layout.slot_bytes
        buf = aligned_buffer(max(1, len(uniq)) * st)
        self.shard.read(uniq, buf, self.io_bytes)
        raw = np.frombuffer(buf, dtype=np.uint8, count=len(uniq) * st).reshape(len(uniq), st)[:, :sb]
        return raw[inv].tobytes()

    def _read_async(self, slots: np.ndarray, buf) -> list[Future]:
        """Issue the batch's reads, ``io_depth`` at a time (the device's queue stays full)."""
        return [self.io.submit(self.shard.read_one, buf, *r) for r in self.shard.read_plan(slots, self.io_bytes)]

    def attend(self, req: AttendRequest) -> AttendResult:
        q = req.q                                                 # [B, L, H, D] fp32
        B, L, H, D = q.shape
        o = np.zeros((B, L, H, D), np.float32)
        lse = np.full((B, L, H), -np.inf, np.float32)
        owner = np.concatenate([np.full(len(b), i, np.int64) for i, b in enumerate(req.blocks)] or [np.zeros(0, np.int64)])
        slots = np.concatenate([np.asarray(b, np.int64) for b in req.blocks] or [np.zeros(0, np.int64)])
        order = np.argsort(slots, kind="stable")
        slots, owner = slots[order], owner[order]
        masks = None
        if req.masks is not None:                                 # [n, H_kv] token masks, same order
            H_kv = self.layout.num_kv_heads
            masks = np.concatenate([np.asarray(m, np.uint64).reshape(-1, H_kv) for m in req.masks]
                                   or [np.zeros((0, H_kv), np.uint64)])[order]
        # batch 0 may already be in the read-ahead buffer (prefetch() of the previous layer)
        ahead, self.ahead = self.ahead, None
        first = 0
        if ahead is not None and len(ahead[0]) <= len(slots) and np.array_equal(ahead[0], slots[:len(ahead[0])]):
            first = len(ahead[0])
        elif ahead is not None:
            for f in ahead[1]:                                   # a stale guess: let it finish, unused
                f.result()
        batches = ([(0, first)] if first else []) + [
            (i, min(i + self.batch_slots, len(slots))) for i in range(first, len(slots), self.batch_slots)]
        bufs = [self.ahead_buf if (n == 0 and first) else self.bufs[n % 2] for n in range(len(batches))]
        read = 0
        if first:
            pending = ahead[1]
        else:
            pending = self._read_async(slots[batches[0][0]:batches[0][1]], bufs[0]) if batches else []
        for n, (i, j) in enumerate(batches):
            read += sum(f.result() for f in pending)              # raises the reader's DiskIOError
            if n + 1 < len(batches):                              # the next batch is read meanwhile
                a, b = batches[n + 1]
                pending = self._read_async(slots[a:b], bufs[n + 1])
            ob, lb = self._attend_batch(q, bufs[n], owner[i:j], None if masks is None else masks[i:j])
            o, lse = merge_np(o, lse, ob, lb)
        return AttendResult(o, lse, read)

    def prefetch(self, blocks: list) -> None:
        """Start reading the first ``ahead_bytes`` of the next request's blocks (the next layer's,
        known before its query is): the read overlaps the model's compute of that layer."""
        if not self.ahead_slots:
            return
        if self.ahead is not None:
            for f in self.ahead[1]:
                f.result()
        slots = np.sort(np.concatenate([np.asarray(b, np.int64) for b in blocks] or [np.zeros(0, np.int64)]))
        slots = slots[:self.ahead_slots]
        self.ahead = (slots, self._read_async(slots, self.ahead_buf)) if len(slots) else None

    def _attend_batch(self, q: np.ndarray, buf, owner: np.ndarray, masks: np.ndarray | None = None,
                      ) -> tuple[np.ndarray, np.ndarray]:
        """Attention over the slots now in ``buf`` (position i belongs to sequence owner[i]);
        ``masks`` ``[n, H_kv]``: the tokens each head attends (sparse decode)."""
        lay, st = self.layout, self.layout.disk_stride
        B, L, H, D = q.shape
        G = H // lay.num_kv_heads
        if L <= MAX_QUERY_ROWS and PagedAttention.available(lay.dtype, G, D, lay.block_size):
            # one kernel row per query: L > 1 (a verify pass) repeats the sequence's block list
            if G not in self.kernels:
                self.kernels[G] = PagedAttention(lay.dtype, lay.num_kv_heads, G, D, lay.block_size)
            base = np.frombuffer(buf, dtype=np.uint8).ctypes.data
            rows = [r for b in range(B) for r in [np.nonzero(owner == b)[0]] * L]
            lists = BlockLists.build([base + st * r for r in rows], [lay.block_size] * (B * L),
                                     None if masks is None else [masks[r] for r in rows])
            qc = np.ascontiguousarray(q.reshape(B * L, H, D), dtype=np.float32)
            out = np.empty((B, L, H, D), np.float32)
            lse = np.empty((B, L, H), np.float32)
            self.kernels[G](B * L, qc.ctypes.data, H * D, lists, out.ctypes.data, lse.ctypes.data, self.threads)
            return out, lse
        out = np.zeros((B, L, H, D), np.float32)
        lse = np.full((B, L, H), -np.inf, np.float32)
        nslots = len(owner)
        arr = np.frombuffer(buf, dtype=_NP[lay.dtype], count=nslots * st // lay.itemsize).reshape(nslots, -1)
        half, Hk, bs = lay.num_kv_heads * D * lay.block_size, lay.num_kv_heads, lay.block_size
        for b in np.unique(owner):
            s = arr[owner == b, :lay.slot_elems]
            n = len(s)
            k = to_f32(s[:, :half], lay.dtype).reshape(n, Hk, D // 2, bs, 2).transpose(1, 0, 3, 2, 4).reshape(Hk, n * bs, D)
            v = to_f32(s[:, half:], lay.dtype).reshape(n, Hk, bs, D).transpose(1, 0, 2, 3).reshape(Hk, n * bs, D)
            valid = None if masks is None else masks_to_valid(masks[owner == b], bs)
            out[b], lse[b] = attend_multi_np(q[b].astype(np.float32), k, v, valid)
        return out, lse


def _serve(conn, path: str, layout: dict, threads: int, batch_bytes: int, ahead_bytes: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)               # Ctrl-C is the main process's to handle
    try:
        server = DiskWorkerServer(path, BlockLayout(**layout), threads, batch_bytes, ahead_bytes)
    except DiskIOError as e:
        conn.send(("err", str(e)))
        return
    conn.send(("ok", os.getpid()))
    while True:
        try:
            op, payload = conn.recv()
        except (EOFError, OSError):
            return
        if op == "close":
            server.shard.close()
            conn.send(("ok", None))
            return
        try:
            if op == "prefetch":                                  # a hint: no reply
                server.prefetch(payload)
                continue
            handler = {"write": server.write, "read": server.read, "attend": server.attend}[op]
            result = handler(payload)
            conn.send(("ok", result))
        except DiskIOError as e:
            conn.send(("err", str(e)))


class ProcessWorker:
    """The main process's handle on one disk worker (the Worker protocol over a pipe)."""

    def __init__(self, path: str, layout: BlockLayout, threads: int, batch_bytes: int, ahead_bytes: int = 0,
                 max_backlog: int = 32 << 20) -> None:
        self.path, self.layout, self.threads, self.batch_bytes = path, layout, threads, batch_bytes
        self.ahead_bytes, self.max_backlog = ahead_bytes, max_backlog
        self.backlog = 0                            # bytes in unacknowledged writes
        self.unacked: list[WriteBlocks] = []        # sent, not yet acknowledged: replayed after a restart
        self.request: AttendRequest | None = None
        self.restarts = 0
        self._start()

    def _start(self) -> None:
        # A fresh interpreter (not fork: the parent runs OpenMP threads; not multiprocessing's
        # spawn: that re-imports the user's __main__), talking over a socket pair.
        mine, theirs = socket.socketpair()
        cmd = [sys.executable, "-m", "kvoffload.attention.workers.process", "--fd", str(theirs.fileno()),
               "--path", self.path, "--layout", json.dumps(asdict(self.layout)),
               "--threads", str(self.threads), "--batch-bytes", str(self.batch_bytes),
               "--ahead-bytes", str(self.ahead_bytes)]
        # own session: a terminal Ctrl-C reaches only the main process, which closes the workers
        self.proc = subprocess.Popen(cmd, pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL, start_new_session=True)
        theirs.close()
        self.conn = Connection(mine.detach())
        status, info = self._recv()
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
            pass                                    # noticed at collect(), which restarts the worker

    # ---- the Worker protocol ----
    def write(self, w: WriteBlocks) -> None:
        """Send whole blocks; their bytes stay here until the worker acknowledges them (for a
        replay after a restart). Acks already in are taken now; past ``max_backlog`` bytes this
        waits for them (back-pressure: the disk, not RAM, absorbs a long prefill)."""
        self.unacked.append(w)
        self.backlog += len(w.data)
        self._send(("write", w))
        if self.request is not None:                # replies are in order: an attend reply is due first
            return
        while self.unacked and (self.backlog > self.max_backlog or self.conn.poll(0)):
            try:
                self._check(self._recv())
            except ConnectionError:
                self._restart()
                continue
            self.backlog -= len(self.unacked.pop(0).data)

    def submit(self, req: AttendRequest) -> None:
        self.request = req
        self._send(("attend", req))

    def prefetch(self, blocks: list) -> None:
        """Hint: the blocks of the next request (read ahead; lost harmlessly on a restart)."""
        self._send(("prefetch", blocks))

    def collect(self) -> AttendResult:
        while True:
            try:
                while self.unacked:
                    self._check(self._recv())
                    self.backlog -= len(self.unacked.pop(0).data)
                result = self._check(self._recv()) if self.request is not None else None
                if result is not None:                  # the payloads that crossed the socket
                    result.bytes_in, result.bytes_out = self.request.q.nbytes, result.o.nbytes + result.lse.nbytes
                self.request = None
                return result
            except ConnectionError:
                self._restart()

    def read(self, slots: np.ndarray) -> bytes:
        """The bytes of ``slots`` (``slot_bytes`` each, in order), after every write sent so far
        (no attend request may be in flight)."""
        if self.request is not None:
            raise RuntimeError("read() while an attend request is in flight")
        while True:
            self.collect()                               # the acknowledgements due first
            self._send(("read", np.asarray(slots, dtype=np.int64)))
            try:
                return self._check(self._recv())
            except ConnectionError:
                self._restart()

    def sync(self) -> None:
        """Wait until every write sent so far is on the shard (no request may be in flight)."""
        if self.request is not None:
            raise RuntimeError("sync() while an attend request is in flight")
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
            self._send(("attend", self.request))

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


def main() -> None:
    ap = argparse.ArgumentParser(description="kvoffload disk worker (started by the engine)")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--path", required=True)
    ap.add_argument("--layout", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--batch-bytes", type=int, required=True)
    ap.add_argument("--ahead-bytes", type=int, default=0)
    a = ap.parse_args()
    _serve(Connection(a.fd), a.path, json.loads(a.layout), a.threads, a.batch_bytes, a.ahead_bytes)


if __name__ == "__main__":
    main()
