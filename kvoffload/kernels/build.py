"""Compile the C kernels once per machine (gcc -O3 -march=native -fopenmp) and load them with ctypes.

No torch headers are involved, so a build takes about a second. The shared object is
cached under ``kernels/`` of the cache root (kvoffload/paths.py: ``--cache-dir``,
``$KVOFFLOAD_CACHE`` or ``~/.cache/kvoffload``), keyed by the
source, the flags and the CPU's feature flags. Set ``KVOFFLOAD_NO_KERNELS=1`` to use the
pure-PyTorch fallbacks; if no compiler is found the fallbacks are used too, with a warning.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from kvoffload.kernels.limits import C_DEFINES

SOURCES = {"paged_attn": Path(__file__).with_name("paged_attn.c"),
           "select": Path(__file__).with_name("select.c"),
           "aio": Path(__file__).with_name("aio.c"),
           "qweights": Path(__file__).with_name("qweights.c"),
           "decode": Path(__file__).with_name("decode.c")}
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=gnu11"]
# Per source. paged_attn: no -ffast-math, so nothing is reassociated and no vector reduction
# depends on a buffer's alignment (its partials must be bit-identical wherever they are
# computed); its limits come from limits.py.
EXTRA_FLAGS = {
    "paged_attn": ["-fno-math-errno", *(f"-D{k}={v}" for k, v in C_DEFINES.items())],
    "select": ["-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
               *(f"-D{k}={v}" for k, v in C_DEFINES.items())],
    "aio": [],
    "qweights": ["-ffp-contract=off"],        # bit-identical to the references (no fused multiply-add)
    "decode": ["-fno-math-errno"],
}


def flags(name: str) -> list[str]:
    """The compiler flags of one source (part of the cache key)."""
    return [*CFLAGS, *EXTRA_FLAGS[name]]


def _cpu_flags() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next((ln for ln in f if ln.startswith("flags")), "")
    except OSError:
        return ""


def _cache_dir() -> Path:
    from kvoffload.paths import cache_root

    return Path(cache_root()) / "kernels"


def _compile(name: str) -> Path:
    src = SOURCES[name]
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    headers = b"".join(h.read_bytes() for h in sorted(src.parent.glob("*.h")))     # included by the sources
    cflags = flags(name)
    key = hashlib.sha256(src.read_bytes() + headers + " ".join(cflags).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = _cache_dir() / f"{name}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, suffix=".so.tmp")
    os.close(fd)
    try:
        r = subprocess.run([cc, *cflags, "-o", tmp, str(src), "-lm"], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")
        os.replace(tmp, out)          # atomic: concurrent builders never load a half-written file
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


@functools.cache
def load(name: str) -> ctypes.CDLL | None:
    """The compiled library, or None (with a warning) when native kernels are unavailable."""
    if os.environ.get("KVOFFLOAD_NO_KERNELS") == "1":
        return None
    try:
        return ctypes.CDLL(str(_compile(name)))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"kvoffload: native kernel {name!r} unavailable, using the PyTorch path ({e})")
        return None
