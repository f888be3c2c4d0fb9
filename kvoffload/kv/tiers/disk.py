"""The disk tier: chunks in shard files under a fresh ``kvoffload-*`` directory, each shard owned
by a worker process (kv/tiers/disk_worker.py) that computes attention over its blocks — or,
with ``--disk-workers 0``, one shard read and attended by this process (:class:`LocalWorker`,
the same code without the process hop).

Chunk ``c`` lives in shard ``c % workers`` (round-robin), at that shard's chunk ``c // workers``:
its blocks are consecutive slots of one file, so a chunk is one read. The main process keeps
the block tables (placement) and every write a worker has not acknowledged, so a worker that
dies is restarted from its file and its unacknowledged writes and the request in flight are
replayed: the output is unchanged.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import weakref
from dataclasses import asdict
from multiprocessing.connection import Connection

import numpy as np
import torch

import kvoffload
from kvoffload.dtypes import storage_torch_dtype
from kvoffload.errors import ConfigError, KvoffloadError
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.disk_worker import WorkerIO, WriteBlocks
from kvoffload.kv.tiers.protocol import (
    AttendRequest,
    AttendResult,
    PooledChunks,
    TierContext,
    TierSpec,
)
from kvoffload.kv.tiers.shards import request_bytes, shard_of, split_request

MAX_RESTARTS = 3
LOCK_FILE = "owner.lock"        # in each kvoffload-* directory: locked (flock) while its owner runs


class WorkerError(KvoffloadError):
    """A disk worker failed for a reason a restart cannot fix (message says which)."""


def _package_root(module) -> str:
    """The directory a package was imported from (what goes on a worker's ``sys.path``)."""
    return os.path.dirname(os.path.dirname(os.path.abspath(module.__file__)))


# Run in an isolated interpreter (-I: no PYTHON* variables, no user site-packages, neither the
# working directory nor the script's on sys.path): the path gets exactly the directories this
# process imported kvoffload and numpy from, so nothing from the user's directory or environment
# is imported (a numpy.py, a sitecustomize.py or a kvoffload/ there is never seen).
_WORKER_BOOT = ("import sys; sys.path[:0] = sys.argv[1:2]; sys.path += sys.argv[2:3]; del sys.argv[1:3]; "
                "from kvoffload.kv.tiers.disk_worker import main; main()")


def _worker_command(args: list[str]) -> list[str]:
    """The worker's command line: an isolated interpreter that imports this process's kvoffload."""
    return [sys.executable, "-I", "-c", _WORKER_BOOT, _package_root(kvoffload), _package_root(np), *args]


def _worker_env() -> dict[str, str]:
    """A worker's environment: ours (its PYTHON* variables are ignored under -I), with the cache
    directory kvoffload uses for its compiled kernels made explicit."""
    from kvoffload.paths import cache_root

    env = dict(os.environ)
    env["KVOFFLOAD_CACHE"] = cache_root()
    return env


class ProcessWorker:
    """The main process's handle on one disk worker process (requests over a socket pair; one
    request — an attend or a read — in flight at a time, writes streamed beside it)."""

    def __init__(self, path: str, layout: BlockLayout, group: int, threads: int, io: WorkerIO,
                 max_backlog: int = 32 << 20, native: bool = True, timeout: float = 60.0) -> None:
        self.path, self.layout, self.group, self.threads = path, layout, group, threads
        self.io, self.max_backlog, self.native = io, max_backlog, native
        self.timeout = timeout                      # seconds a reply may take before the worker counts as hung
        self.backlog = 0                            # bytes in unacknowledged writes
        self.unacked: list[WriteBlocks] = []        # sent, not yet acknowledged: replayed after a restart
        self.request: tuple[str, object] | None = None
        self.restarts = 0
        self.hung = 0                               # restarts because a reply did not come in time
        self._start()

    def _start(self) -> None:
        # A fresh isolated interpreter (not fork: the parent runs OpenMP threads; not
        # multiprocessing's spawn: that re-imports the user's __main__), talking over a socket
        # pair, working in the offload directory (see _worker_command).
        mine, theirs = socket.socketpair()
        args = ["--fd", str(theirs.fileno()), "--path", self.path, "--layout", json.dumps(asdict(self.layout)),
                "--group", str(self.group), "--threads", str(self.threads), "--io", json.dumps(asdict(self.io))] \
            + ([] if self.native else ["--no-native"])
        # its stderr goes to a log beside its shard (read back when it fails to start)
        log = self.path + ".log"
        with open(log, "ab") as err:
            # own session: a terminal Ctrl-C reaches only the main process, which closes the workers
            self.proc = subprocess.Popen(_worker_command(args), pass_fds=(theirs.fileno(),), stdin=subprocess.DEVNULL,
                                         stderr=err, start_new_session=True, env=_worker_env(),
                                         cwd=os.path.dirname(self.path) or None)
        theirs.close()
        self.conn = Connection(mine.detach())
        try:
            status, info = self._recv()
        except ConnectionError as e:
            self._stop()
            why = _last_line(log) or str(e.__cause__ or e)
            raise WorkerError(f"disk worker for {self.path} exited while starting: {why}") from None
        if status != "ok":
            self._stop()
            raise WorkerError(info)
        self.pid = info

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None

    def _recv(self):
        """The next reply; a worker that sends none within ``timeout`` seconds (stopped, hung)
        is killed and counts as dead (the caller restarts it and replays)."""
        try:
            answered = self.conn.poll(self.timeout)
            if answered:
                return self.conn.recv()
        except (EOFError, OSError) as e:
            raise ConnectionError("disk worker died") from e
        self.hung += 1
        self._stop()
        raise ConnectionError(f"no answer within {self.timeout:g} s (--disk-worker-timeout)")

    def _stop(self) -> None:
        """Kill the process (whatever its state: a stopped one too) and reap it."""
        if self.alive:
            self.proc.kill()
        self.proc.wait()

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
            self._stop()
            hung = f", {self.hung} of them hung (no answer within {self.timeout:g} s)" if self.hung else ""
            raise WorkerError(f"disk worker for {self.path} failed {self.restarts} times{hung}")
        self._stop()
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
        self._stop()
        self.conn.close()


class LocalWorker:
    """A disk shard read and attended by this process (``--disk-workers 0``): the same reads
    (O_DIRECT, coalesced, many in flight through native AIO or reader threads) and the same kernel as a worker
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

    def write(self, w: WriteBlocks) -> None:
        self.server.write(w)

    def submit(self, op: str, payload) -> None:
        if self.request is not None:
            raise RuntimeError("a disk request is already in flight")
        if op == "attend":
            req, ahead = payload
            self.server.begin(req)
            if ahead is not None:
                self.server.prefetch(ahead)
        self.request = (op, payload)

    def prefetch(self, req: AttendRequest) -> None:
        self.server.prefetch(req)                   # (into the read-ahead buffer an attend in flight does not read)

    def collect(self):
        if self.request is None:
            return None
        (op, payload), self.request = self.request, None
        return self.server.finish() if op == "attend" else self.server.read(payload)

    def sync(self) -> None:
        pass                                        # writes are made when sent

    def close(self) -> None:
        self.server.close()


def _last_line(path: str) -> str:
    """The last non-empty line of a (small) log file, or ''."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            lines = [ln.strip() for ln in f.read().decode("utf-8", "replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


_LOCKS: dict[str, int] = {}     # offload directory -> the fd holding its owner lock (for our lifetime)


def _cleanup(workers: list[ProcessWorker], directory: str) -> None:
    for w in workers:
        try:
            w.close()
        except Exception:           # noqa: BLE001 - best effort at exit
            pass
    shutil.rmtree(directory, ignore_errors=True)
    fd = _LOCKS.pop(directory, None)
    if fd is not None:
        os.close(fd)


def _lock_dir(directory: str) -> None:
    """Lock ``directory`` for this process's lifetime: an exclusive flock on its LOCK_FILE
    (written with our pid, for people), made under another name and renamed into place, so a
    run that finds the file finds it locked. The kernel drops the lock when we die however we
    die (SIGKILL too), and the fd is not inherited by the workers."""
    tmp = os.path.join(directory, LOCK_FILE + ".new")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()}\n".encode())
        os.rename(tmp, os.path.join(directory, LOCK_FILE))
    except OSError:
        os.close(fd)
        raise
    _LOCKS[directory] = fd


def remove_stale_dirs(base: str) -> list[str]:
    """Remove the ``kvoffload-*`` directories in ``base`` that are ours and whose owner is gone
    (their lock is free: the process was killed before it could clean up); returns them.
    Directories without a lock file (being created, or made by an older kvoffload) are left."""
    removed = []
    try:
        names = [n for n in os.listdir(base) if n.startswith("kvoffload-")]
    except OSError:
        return removed
    for name in names:
        d = os.path.join(base, name)
        try:
            st = os.lstat(d)
            if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or d in _LOCKS:
                continue
            fd = os.open(os.path.join(d, LOCK_FILE), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            continue                # its owner is running
        try:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        if not os.path.exists(d):
            removed.append(d)
    return removed


def make_offload_dir(base: str | None, budget: int | None) -> str:
    """A fresh private ``kvoffload-*`` directory inside ``base`` (default: the system temp dir),
    locked for this process's lifetime; stale ones left there by killed runs are removed first."""
    base = check_offload_base(base)
    stale = remove_stale_dirs(base)
    if stale:
        print(f"kvoffload: removed {len(stale)} offload director{'y' if len(stale) == 1 else 'ies'} left by "
              f"killed runs: {', '.join(stale)}", file=sys.stderr)
    free = shutil.disk_usage(base).free
    if budget is not None and budget > free:
        raise ConfigError(f"the disk tier's budget of {budget} bytes exceeds the {free} bytes free in {base}")
    try:
        directory = tempfile.mkdtemp(prefix="kvoffload-", dir=base)
    except OSError as e:
        raise ConfigError(f"cannot create a directory in {base}: {e.strerror}") from None
    try:
        _lock_dir(directory)
    except OSError:                 # a filesystem without flock: works, but is not reclaimed after a SIGKILL
        for name in (LOCK_FILE, LOCK_FILE + ".new"):
            try:
                os.unlink(os.path.join(directory, name))
            except OSError:
                pass
    return directory


def check_offload_base(base: str | None) -> str:
    """``--offload-dir`` (default: the system temp dir), checked: an existing, writable directory."""
    base = base or tempfile.gettempdir()
    if not os.path.exists(base):
        raise ConfigError(f"offload directory {base} does not exist")
    if not os.path.isdir(base):
        raise ConfigError(f"offload directory {base} is not a directory")
    if not os.access(base, os.W_OK | os.X_OK):
        raise ConfigError(f"offload directory {base} is not writable")
    return base


class DiskTier(PooledChunks):
    """Shard files under ``--offload-dir``, one worker process each (``--disk-workers``)."""

    medium = "disk"
    prefetches = True

    @staticmethod
    def chunk_bytes(layout: BlockLayout) -> int:
        """Bytes one chunk takes of the budget (slots at the disk stride)."""
        return layout.chunk_blocks * layout.disk_stride

    def __init__(self, spec: TierSpec, ctx: TierContext) -> None:
        super().__init__(spec, ctx)
        lay, kv = ctx.layout, ctx.kv
        self.directory = make_offload_dir(kv.offload_dir, spec.budget)
        self.workers: list[ProcessWorker] = []
        self._unsent: dict[int, AttendRequest] = {}        # worker -> its part of the submitted request, not sent yet
        self._finalizer = weakref.finalize(self, _cleanup, self.workers, self.directory)
        # the disks bound these workers: their kernels share the cores (OpenMP teams that
        # outnumber the cores stall each other at every barrier)
        per_worker = max(1, ctx.threads // max(1, kv.disk_workers))
        io = WorkerIO(kv.disk_read_batch, kv.disk_read_ahead, kv.disk_read_blocks, kv.disk_io_depth,
                      reader=kv.disk_reader, cache_bytes=kv.disk_block_cache // max(1, kv.disk_workers))
        if kv.disk_workers == 0:                    # one shard, read and attended in this process
            self.workers.append(LocalWorker(os.path.join(self.directory, "shard-0.kv"), lay, ctx.group,
                                            ctx.threads, io, ctx.native))
        for i in range(kv.disk_workers):
            self.workers.append(ProcessWorker(os.path.join(self.directory, f"shard-{i}.kv"), lay, ctx.group,
                                              per_worker, io, kv.disk_write_backlog, ctx.native, kv.disk_worker_timeout))
        self._writes: dict[int, list[tuple[np.ndarray, bytes]]] = {}
        self._split: list[tuple[int, np.ndarray]] | None = None      # the request in flight, per shard
        # one shard read by this process, block by block: a sparse step reads its blocks here
        # (aligned groups of read_blocks stay with the request path, which reads them)
        self._local = self.workers[0].server if kv.disk_workers == 0 else None
        self.direct = self._local is not None and kv.disk_read_blocks == 1

    @property
    def resident(self) -> np.ndarray | None:
        cache = self._local.cache if self._local is not None else None
        return cache.resident if cache is not None else None

    def locs(self, slots: np.ndarray) -> np.ndarray:
        return -(np.asarray(slots, np.int64) + 1)          # (one shard: its slots are the tier's)

    def fetch(self, layer: int, slots: np.ndarray, ptrs: np.ndarray, refs: np.ndarray) -> None:
        self.flush()
        read, cached = self._local.fetch(layer, slots, ptrs, refs)        # (a DiskIOError, as collect's)
        self.counters.attended(read, len(slots))
        self.counters.cached += cached

    def _where(self, slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Tier slots -> (shard, the shard's slot)."""
        return shard_of(slots, self.ctx.layout.chunk_blocks, len(self.workers))

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
        return torch.from_numpy(out).view(storage_torch_dtype(self.ctx.layout.dtype)).to(self.ctx.device)

    # ---- attention ----
    def _per_shard(self, req: AttendRequest) -> list[tuple[int, np.ndarray, AttendRequest]]:
        """The request cut by shard: (worker, the items it gets, its request)."""
        return split_request(req, self.ctx.layout.chunk_blocks, len(self.workers))

    def submit(self, req: AttendRequest) -> None:
        """The request goes out with the next layer's hint when :meth:`prefetch` follows before
        :meth:`collect` (the backend gives it right after): one message a worker instead of two
        (waking a worker process is the cost on a host with few cores: ~0.1-0.4 ms a message
        here), and the worker starts that read-ahead before it computes this attend."""
        split = self._per_shard(req)
        self.flush()
        self._split = (req, split)
        self._unsent = {w: sub for w, _, sub in split}

    def _send_unsent(self) -> None:
        for w, sub in self._unsent.items():
            self.workers[w].submit("attend", (sub, None))
        self._unsent = {}

    def prefetch(self, req: AttendRequest) -> None:
        for w, _, sub in self._per_shard(req):
            if w in self._unsent:
                self.workers[w].submit("attend", (self._unsent.pop(w), sub))
            else:
                self.workers[w].prefetch(sub)
        self._send_unsent()

    def collect(self) -> AttendResult:
        self._send_unsent()
        req, split = self._split
        self._split = None
        B, L, H, D = req.q.shape
        N = req.num_items
        o = np.zeros((N, L, H, D), np.float32)
        lse = np.full((N, L, H), -np.inf, np.float32)
        read = sent = back = ahead = cached = 0
        for w, items, sub in split:
            r: AttendResult = self.workers[w].collect()
            o[items], lse[items] = r.o, r.lse
            read += r.bytes_read
            ahead += r.ahead
            cached += r.cached
            sent += request_bytes(sub)
            back += r.o.nbytes + r.lse.nbytes
        c = self.counters
        c.attended(read, len(req.slots))
        c.to_worker += sent
        c.from_worker += back
        c.ahead += ahead
        c.cached += cached
        return AttendResult(torch.from_numpy(o), torch.from_numpy(lse), read, sent, back, ahead, cached)

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
