"""A small, fast GGUF (v2/v3) reader: metadata, tensor index, memory-mapped tensor bytes.

``gguf.GGUFReader`` builds a numpy view per field part, which takes seconds for a
150K-token vocabulary; this parser reads the header with ``struct`` in one pass
(~0.1 s) and maps tensor data lazily. Dequantisation uses the native kernel of
``kernels/qweights.c`` for the block types it reads (``gguf.quants`` is its reference and
the fallback).
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from kvoffload.errors import ModelLoadError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# GGUF value types -> struct format (scalars)
_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32, 6: np.float32,
          7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]     # GGUF order: ne0 (fastest, the row length) first
    qtype: int                 # ggml type id
    offset: int                # absolute file offset of the data
    nbytes: int

    @property
    def rows_cols(self) -> tuple[int, int]:
        cols = self.shape[0]
        return (int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1), cols


class _Cursor:
    def __init__(self, buf: memoryview, path: str) -> None:
        self.buf, self.pos, self.path = buf, 0, path

    def unpack(self, fmt: str) -> Any:
        try:
            (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error:
            raise ModelLoadError(f"{self.path}: truncated GGUF header") from None
        self.pos += struct.calcsize(fmt)
        return v

    def string(self) -> str:
        n = self.unpack("Q")
        if self.pos + n > len(self.buf):
            raise ModelLoadError(f"{self.path}: truncated GGUF header (string runs past the end)")
        s = bytes(self.buf[self.pos:self.pos + n]).decode("utf-8", errors="replace")
        self.pos += n
        return s

    def value(self, vtype: int) -> Any:
        if vtype in _SCALARS:
            return self.unpack(_SCALARS[vtype])
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, count = self.unpack("I"), self.unpack("Q")
            if etype in _NUMPY:
                size = np.dtype(_NUMPY[etype]).itemsize * count
                if self.pos + size > len(self.buf):
                    raise ModelLoadError(f"{self.path}: truncated GGUF header (array runs past the end)")
                arr = np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=self.pos).tolist()
                self.pos += size
                return arr
            return [self.value(etype) for _ in range(count)]
        raise ModelLoadError(f"{self.path}: corrupt GGUF (unknown value type {vtype})")


class GGUFFile:
    """Parsed header + a read-only memory map of the file."""

    def __init__(self, path: str) -> None:
        from gguf.constants import GGML_QUANT_SIZES

        if not os.path.exists(path):
            raise ModelLoadError(f"model file not found: {path}")
        if os.path.isdir(path):
            raise ModelLoadError(f"{path} is a directory without config.json (expected a GGUF file or HF model dir)")
        self.path, size = path, os.path.getsize(path)
        if size < 24:
            raise ModelLoadError(f"{path}: not a GGUF file ({size} bytes)")
        try:
            with open(path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        except OSError as e:
            raise ModelLoadError(f"{path}: cannot read ({e.strerror or e})") from None
        cur = _Cursor(memoryview(self._mm), path)
        if bytes(cur.buf[:4]) != MAGIC:
            raise ModelLoadError(f"{path}: not a GGUF file (magic {bytes(cur.buf[:4])!r}, expected {MAGIC!r})")
        cur.pos = 4
        self.version = cur.unpack("I")
        if self.version not in (2, 3):
            raise ModelLoadError(f"{path}: unsupported GGUF version {self.version} (supported: 2, 3)")
        n_tensors, n_kv = cur.unpack("Q"), cur.unpack("Q")
        if n_tensors > 1 << 20 or n_kv > 1 << 20:
            raise ModelLoadError(f"{path}: corrupt GGUF header ({n_tensors} tensors, {n_kv} keys)")
        self.metadata: dict[str, Any] = {}
        for _ in range(n_kv):
            key = cur.string()
            self.metadata[key] = cur.value(cur.unpack("I"))
        infos = []
        for _ in range(n_tensors):
            name, nd = cur.string(), cur.unpack("I")
            shape = tuple(cur.unpack("Q") for _ in range(nd))
            qtype, rel = cur.unpack("I"), cur.unpack("Q")
            infos.append((name, shape, qtype, rel))
        align = int(self.metadata.get("general.alignment", DEFAULT_ALIGNMENT))
        data_start = (cur.pos + align - 1) // align * align
        self.tensors: dict[str, TensorInfo] = {}
        for name, shape, qtype, rel in infos:
            if qtype not in GGML_QUANT_SIZES:
                raise ModelLoadError(f"{path}: tensor {name} has unknown ggml type {qtype}")
            block, type_size = GGML_QUANT_SIZES[qtype]
            nbytes = int(np.prod(shape)) // block * type_size
            info = TensorInfo(name, shape, qtype, data_start + rel, nbytes)
            if info.offset + nbytes > size:
                raise ModelLoadError(f"{path}: truncated GGUF (tensor {name} ends past the end of the file)")
            self.tensors[name] = info

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as ``[rows, bytes_per_row]`` uint8 (no copy)."""
        info = self.tensors[name]
        rows, _ = info.rows_cols
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset).reshape(rows, -1)

    def release(self, name: str, r0: int = 0, r1: int | None = None) -> None:
        """Drop a tensor's pages (of rows ``r0:r1``; default all) from this process's resident set
        (they stay in the page cache; a later read maps them back): the map's pages count in RSS
        once read."""
        info = self.tensors[name]
        rows, _ = info.rows_cols
        row_bytes = info.nbytes // rows
        end = info.offset + row_bytes * (rows if r1 is None else r1)
        start = (info.offset + row_bytes * r0) // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)
        except (AttributeError, OSError, ValueError):     # no madvise here: the pages just stay
            pass

    def dequantize(self, name: str) -> np.ndarray:
        """float32 ``[rows, cols]`` (1-D tensors come back as ``[1, n]``)."""
        from kvoffload.kernels.qweights import gguf_dequant

        info = self.tensors[name]
        try:
            out = gguf_dequant(self.raw(name), info.qtype, info.rows_cols[1]).reshape(info.rows_cols)
        except (ValueError, NotImplementedError) as e:
            raise ModelLoadError(f"{self.path}: cannot dequantise {name} (type {info.qtype}: {e})") from None
        return out if out.flags.writeable else out.copy()     # F32 tensors come back as views of the map
