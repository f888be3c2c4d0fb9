"""The persistent KV block store: each full block of a prompt's KV (``block_size`` tokens, every
layer) kept as one file that outlives the process, found again by content.

**Keys.** A block's key chains what its KV depends on: ``blake2b(namespace, previous block's key,
token ids)`` where the namespace is the digest of the model's fingerprint (its weight files'
content, compute dtype, device type) and the KV layout (block size, KV heads, head width, KV
dtype, slot format). So a key names one prefix of one prompt under one model and layout; a store
shared by several models or layouts just holds disjoint chains. blake2b is in the standard
library and collision-resistant, so two prefixes never share a key by accident.

**File format** (``blocks/<2 hex>/<64 hex key>.kvb``, page-aligned slots):
a 4096-byte header (magic, format version, geometry, the block's key, its parent key, the
namespace, the token ids, an xxh3-64 checksum of the payload and one of the header), then the
block's slot of every layer, each at a page-aligned stride (``layout.page_stride``). A header
that does not re-derive its own key from (namespace, parent, tokens), or a payload whose
checksum fails, is *damaged*: the block is deleted and recomputed, never attended.

**Writes are atomic**: written to ``tmp/`` (mode 0600), fsynced per the fsync policy, renamed
into place. fsync policy ``file`` (the default): each block file is fsynced before its rename and
its directory after, so after a crash or power loss a block file is either absent or complete;
``none``: no fsync (faster; a block torn by a power loss fails its checksum and is recomputed).
A process killed at any point leaves at most a ``tmp/`` file, removed by the next process that
opens the store once its writer is gone.

**Management.** The index (key -> bytes, last use) is rebuilt from the directory when a store is
opened. A byte budget (``--kv-store-budget``) is kept by deleting the least recently used blocks
(a block's mtime is its last use; a hit touches the blocks of the chain from the last to the
first, so a prefix is never older than its extensions) other than those this process holds for
running sequences. Several processes may share a store: block files are immutable and renamed
into place, so readers never see a partial file; eviction and the format file are serialised by
``flock`` on ``store.lock``; a block deleted under a reader is a miss (recomputed).
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import os
import struct
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

from kvoffload.config import KV_STORE_FSYNC
from kvoffload.errors import ConfigError, KvoffloadError
from kvoffload.kv.layout import PAGE, BlockLayout

FORMAT = 1
MAGIC = b"KVOBLK01"
SLOT_FORMAT = "k-pair-major/v-token-major/1"     # the slot transform of kv/layout.py
HEADER = PAGE
_FIXED = struct.Struct("<8sIIIIIIQ32s32s32s")    # magic, format, layers, slot bytes, stride, block size,
#                                                  tokens, payload checksum, key, parent, namespace
ROOT = bytes(32)                                 # the parent of a prompt's first block


class StoreError(KvoffloadError):
    """The store directory cannot be used (the message says why)."""


def warn(msg: str) -> None:
    """A one-line warning on stderr (recomputation follows; nothing failed)."""
    print(f"kvoffload: warning: {msg}", file=sys.stderr, flush=True)


def _checksum(data) -> int:
    import xxhash

    return xxhash.xxh3_64_intdigest(data)


def namespace(fingerprint: str, layout: BlockLayout) -> bytes:
    """The digest that opens every chain of this model and KV layout."""
    desc = json.dumps({"model": fingerprint, "block_size": layout.block_size, "kv_heads": layout.num_kv_heads,
                       "head_dim": layout.head_dim, "dtype": layout.dtype, "slot": SLOT_FORMAT}, sort_keys=True)
    return hashlib.blake2b(desc.encode(), digest_size=32).digest()


def block_key(ns: bytes, parent: bytes, tokens: np.ndarray) -> bytes:
    """The key of the block holding ``tokens`` (int token ids) after the block keyed ``parent``."""
    h = hashlib.blake2b(digest_size=32, person=b"kvoffload-blk")
    h.update(ns)
    h.update(parent)
    h.update(np.asarray(tokens, "<i4").tobytes())
    return h.digest()


def chain_keys(ns: bytes, token_ids, block_size: int, n_blocks: int) -> list[bytes]:
    """Keys of the first ``n_blocks`` full blocks of a token sequence."""
    keys, parent = [], ROOT
    ids = np.asarray(token_ids[:n_blocks * block_size], np.int64)
    for b in range(n_blocks):
        parent = block_key(ns, parent, ids[b * block_size:(b + 1) * block_size])
        keys.append(parent)
    return keys


@dataclass(frozen=True)
class BlockHeader:
    """What a block file says of itself (see the module docstring)."""

    layers: int
    slot_bytes: int
    stride: int
    block_size: int
    checksum: int
    key: bytes
    parent: bytes
    namespace: bytes
    tokens: np.ndarray

    def pack(self) -> bytes:
        fixed = _FIXED.pack(MAGIC, FORMAT, self.layers, self.slot_bytes, self.stride, self.block_size,
                            len(self.tokens), self.checksum, self.key, self.parent, self.namespace)
        body = fixed + np.asarray(self.tokens, "<i4").tobytes()
        return (body + struct.pack("<Q", _checksum(body))).ljust(HEADER, b"\0")

    @staticmethod
    def unpack(raw: bytes) -> BlockHeader | None:
        """The header, or None when it is not one of ours or damaged."""
        if len(raw) < _FIXED.size:
            return None
        magic, fmt, layers, sb, stride, bs, n, ck, key, parent, ns = _FIXED.unpack_from(raw)
        if magic != MAGIC or fmt != FORMAT or n > (HEADER - _FIXED.size - 8) // 4:
            return None
        end = _FIXED.size + 4 * n
        if struct.unpack_from("<Q", raw, end)[0] != _checksum(raw[:end]):
            return None
        tokens = np.frombuffer(raw[_FIXED.size:end], "<i4").astype(np.int64)
        h = BlockHeader(layers, sb, stride, bs, ck, key, parent, ns, tokens)
        return h if block_key(ns, parent, tokens) == key else None


@dataclass(frozen=True)
class Entry:
    """An indexed block file: its key (hex), bytes on disk and last use (mtime, ns)."""

    key: str
    bytes: int
    used_ns: int


@dataclass
class StoreCounters:
    """Cumulative: blocks found (hits) and their tokens, blocks written, blocks dropped as
    damaged, blocks evicted for the budget, writes that failed (disk full)."""

    hits: int = 0
    hit_tokens: int = 0
    written: int = 0
    damaged: int = 0
    evicted: int = 0
    failed_writes: int = 0


class BlockDir:
    """A store directory: its files, index, locks and budget. Knows nothing of models: blocks
    are keys and bytes (the engine side, :class:`PrefixStore`, gives them meaning)."""

    def __init__(self, path: str, budget: int | None = None, fsync: str = "file", create: bool = True) -> None:
        self.path = os.path.abspath(os.path.expanduser(path))
        self.budget, self.fsync = budget, fsync
        if fsync not in KV_STORE_FSYNC:
            raise ConfigError(f"kv_store_fsync must be one of {', '.join(KV_STORE_FSYNC)}, got {fsync!r}")
        self.counters = StoreCounters()
        self._warned_full = False                  # one warning while the disk stays full
        self.pinned: dict[str, int] = {}           # key hex -> users in this process (never evicted by it)
        self._open(create)
        self.index: dict[str, Entry] = {}
        self.rescan()

    # ---- opening ----
    def _open(self, create: bool) -> None:
        p = self.path
        if os.path.exists(p) and not os.path.isdir(p):
            raise StoreError(f"KV store {p} is not a directory")
        if not os.path.exists(p):
            if not create:
                raise StoreError(f"KV store {p} does not exist")
            try:
                os.makedirs(p, mode=0o700)
            except OSError as e:
                raise StoreError(f"cannot create KV store {p}: {e.strerror}") from None
        if create and not os.access(p, os.W_OK | os.X_OK):
            raise StoreError(f"KV store {p} is not writable")
        meta = os.path.join(p, "store.json")
        try:
            if create:
                for sub in ("blocks", "tmp"):
                    os.makedirs(os.path.join(p, sub), mode=0o700, exist_ok=True)
                with self.lock():
                    if not os.path.exists(meta):
                        self._atomic_write(meta, json.dumps({"format": FORMAT, "kind": "kvoffload-kv-store"}).encode())
            elif not os.path.exists(meta):
                raise StoreError(f"{p} is not a kvoffload KV store (no store.json)")
            with open(meta) as f:
                info = json.load(f)
        except OSError as e:
            if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StoreError(f"KV store {p} is not writable ({e.strerror})") from None
            raise StoreError(f"cannot use KV store {p}: {e.strerror or e}") from None
        except (ValueError, UnicodeDecodeError):
            raise StoreError(f"KV store {p}: store.json is damaged (not JSON); move the directory away") from None
        if not isinstance(info, dict) or info.get("kind") != "kvoffload-kv-store":
            raise StoreError(f"{p} is not a kvoffload KV store (store.json says otherwise)")
        if info.get("format") != FORMAT:
            raise StoreError(f"KV store {p} has format {info.get('format')!r}; this kvoffload reads format {FORMAT}")
        if create:
            self._clean_tmp()

    def lock(self, shared: bool = False):
        """``with store.lock():`` the store-wide flock (eviction, format file, prune)."""
        return _Flock(os.path.join(self.path, "store.lock"), shared)

    def _clean_tmp(self) -> None:
        """Remove temporary files whose writer process is gone (killed mid-write)."""
        tmp = os.path.join(self.path, "tmp")
        for name in os.listdir(tmp):
            try:
                pid = int(name.split(".")[-3])                # <key>.kvb.<pid>.<random>.tmp
            except (IndexError, ValueError):
                pid = -1
            if pid > 0 and pid != os.getpid() and _alive(pid):
                continue
            if pid == os.getpid():
                continue
            try:
                os.unlink(os.path.join(tmp, name))
            except FileNotFoundError:
                pass

    # ---- the index ----
    def files(self) -> Iterator[tuple[str, str]]:
        """(key hex, path) of every block file in the directory."""
        root = os.path.join(self.path, "blocks")
        for sub in sorted(os.listdir(root)):
            d = os.path.join(root, sub)
            if not os.path.isdir(d):
                continue
            for name in sorted(os.listdir(d)):
                if name.endswith(".kvb") and len(name) == 68:
                    yield name[:-4], os.path.join(d, name)

    def rescan(self) -> None:
        """Rebuild the index from the directory (what other processes wrote or evicted shows)."""
        index = {}
        for key, path in self.files():
            try:
                st = os.stat(path)
            except FileNotFoundError:
                continue
            index[key] = Entry(key, st.st_size, st.st_mtime_ns)
        self.index = index

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, "blocks", key[:2], key + ".kvb")

    @property
    def bytes_held(self) -> int:
        return sum(e.bytes for e in self.index.values())

    # ---- reading ----
    def read(self, key: str, expect: Callable[[BlockHeader], bool],
             report: Callable[[str], None] | None = None,
             buf: bytearray | None = None) -> tuple[BlockHeader, bytes | memoryview] | None:
        """The block's header and payload, or None: absent (a miss), or damaged / not what
        ``expect`` accepts (then deleted, with a one-line warning; with ``report``, only
        reported to it, and kept). ``buf``: the file is read into it (an empty one is sized by
        the first file; a larger file is read apart) and the result is a view of it, valid until
        the next read into it (no fresh memory a block: reading a long prefix's blocks then
        faults no new pages)."""
        path = self.file_of(key)
        try:
            with open(path, "rb", buffering=0) as f:
                size = os.fstat(f.fileno()).st_size
                if buf is not None and not buf:
                    buf.extend(bytes(size))                # sized by the first block read
                if buf is None or size > len(buf):         # (a block of another size: read apart)
                    raw = f.readall()
                else:
                    view, got = memoryview(buf), 0
                    while got < size:
                        k = f.readinto(view[got:size])
                        if not k:
                            break                          # shorter than its size said: judged below
                        got += k
                    raw = view[:got]
        except FileNotFoundError:
            self.index.pop(key, None)
            return None
        except OSError as e:
            warn(f"KV store block {key[:12]} cannot be read ({e.strerror}); recomputing it")
            return None
        h = BlockHeader.unpack(raw[:HEADER])
        why = None
        if h is None or h.key.hex() != key:
            why = "its header is damaged"
        elif len(raw) != HEADER + h.layers * h.stride:
            why = f"it is {len(raw)} bytes, not {HEADER + h.layers * h.stride} (truncated)"
        elif not expect(h):
            why = "its geometry does not match its key"
        else:
            payload = memoryview(raw)[HEADER:]
            if _checksum(payload) != h.checksum:
                why = "its checksum fails"
        if why is not None:
            if report is not None:
                report(why)
            else:
                self.drop(key, f"KV store block {key[:12]} dropped: {why}; recomputing it")
            return None
        return h, raw

    def drop(self, key: str, message: str) -> None:
        """Delete a damaged block (one warning line)."""
        self.counters.damaged += 1
        warn(message)
        self.remove(key)

    def touch(self, keys: list[str]) -> None:
        """Mark blocks used now (last to first: a prefix stays at least as recent as its extensions)."""
        now = time.time_ns()
        for i, key in enumerate(reversed(keys)):
            t = now + i                                       # strictly increasing towards the first block
            try:
                os.utime(self.file_of(key), ns=(t, t))
            except OSError:
                continue
            if key in self.index:
                self.index[key] = Entry(key, self.index[key].bytes, t)

    # ---- writing ----
    def write(self, key: str, data: bytes | bytearray) -> bool:
        """Store one block file atomically; False (one warning) when the disk is full or the
        write fails otherwise. An existing block (another process wrote it) is kept."""
        path = self.file_of(key)
        if os.path.exists(path):
            return True
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._atomic_write(path, data)
        except OSError as e:
            self.counters.failed_writes += 1
            full = e.errno in (errno.ENOSPC, errno.EDQUOT)
            if not (full and self._warned_full):
                what = "the disk is full" if full else e.strerror or str(e)
                warn(f"KV store {self.path}: a block could not be written ({what}); blocks not stored are "
                     f"recomputed when needed")
            self._warned_full = full
            return False
        self._warned_full = False
        self.index[key] = Entry(key, len(data), time.time_ns())
        self.counters.written += 1
        return True

    def _atomic_write(self, path: str, data: bytes) -> None:
        tmp = os.path.join(self.path, "tmp", f"{os.path.basename(path)}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            try:
                _write_all(fd, data)
                if self.fsync == "file":
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise

    def sync_dirs(self, keys: list[str]) -> None:
        """fsync the directories the blocks were renamed into (policy ``file``)."""
        if self.fsync != "file":
            return
        for d in {os.path.dirname(self.file_of(k)) for k in keys}:
            try:
                fd = os.open(d, os.O_RDONLY)
            except OSError:
                continue
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    # ---- keeping the budget ----
    def enforce_budget(self, budget: int | None = None) -> int:
        """Delete least recently used blocks (not pinned by this process) until the store holds
        at most ``budget`` bytes (default: the store's); returns the blocks deleted."""
        budget = self.budget if budget is None else budget
        if budget is None:
            return 0
        n = 0
        with self.lock():
            self.rescan()
            held = self.bytes_held
            if held <= budget:
                return 0
            for e in sorted(self.index.values(), key=lambda e: (e.used_ns, e.key)):
                if held <= budget:
                    break
                if e.key in self.pinned:
                    continue
                self.remove(e.key)
                held -= e.bytes
                n += 1
        self.counters.evicted += n
        return n

    # ---- inspection (``kvoffload store``) ----
    def headers(self) -> Iterator[tuple[str, BlockHeader | None]]:
        """(key hex, header or None when damaged) of every block file (headers only are read)."""
        for key, path in self.files():
            try:
                with open(path, "rb") as f:
                    h = BlockHeader.unpack(f.read(HEADER))
            except OSError:
                continue
            yield key, (h if h is not None and h.key.hex() == key else None)

    def check(self, key: str) -> str | None:
        """Why the block file is damaged, or None when it is sound (read whole, checksums checked)."""
        problems: list[str] = []
        self.read(key, lambda h: True, report=problems.append)
        return problems[0] if problems else None

    def orphans(self) -> list[str]:
        """Blocks whose parent block is gone: no prompt can reach them."""
        have = dict(self.headers())
        return [k for k, h in have.items() if h is not None and h.parent != ROOT and h.parent.hex() not in have]

    def note_namespace(self, ns: bytes, info: dict) -> None:
        """Record what a namespace is (model, layout) for ``kvoffload store ls``; once."""
        path = os.path.join(self.path, "ns", ns.hex() + ".json")
        if os.path.exists(path):
            return
        try:
            os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
            self._atomic_write(path, json.dumps(info, sort_keys=True).encode())
        except OSError:
            pass                                   # a description only

    def namespaces(self) -> dict[str, dict]:
        out = {}
        d = os.path.join(self.path, "ns")
        for name in sorted(os.listdir(d)) if os.path.isdir(d) else []:
            try:
                with open(os.path.join(d, name)) as f:
                    out[name[:-5]] = json.load(f)
            except (OSError, ValueError):
                continue
        return out

    def remove(self, key: str) -> None:
        try:
            os.unlink(self.file_of(key))
        except FileNotFoundError:
            pass
        self.index.pop(key, None)

    def pin(self, keys: list[str]) -> None:
        for k in keys:
            self.pinned[k] = self.pinned.get(k, 0) + 1

    def unpin(self, keys: list[str]) -> None:
        for k in keys:
            left = self.pinned.get(k, 0) - 1
            if left > 0:
                self.pinned[k] = left
            else:
                self.pinned.pop(k, None)


class _Flock:
    def __init__(self, path: str, shared: bool) -> None:
        self.path, self.shared, self.fd = path, shared, -1

    def __enter__(self):
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        fcntl.flock(self.fd, fcntl.LOCK_SH if self.shared else fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_all(fd: int, data) -> None:
    """The seam the fault tests replace (a full disk: ``OSError(ENOSPC)``)."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]
