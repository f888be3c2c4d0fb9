"""Compile the C kernels once per machine (gcc -O3 -march=native -fopenmp) and load them with ctypes.

No torch headers are involved; paged_attn.c, with its bodies specialised per shape, takes ~45 s
(the others a few seconds) on this project's 2-core machines, once per source. The shared object is
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


def _cc() -> str:
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("cc")
    if cc is None:
        raise RuntimeError("no C compiler (gcc/cc) on PATH")
    return cc


def _build(name: str, src: Path | str, out: Path | str, extra: tuple[str, ...] = ()) -> None:
    """Compile ``src`` as kernel ``name`` is compiled (its flags; the headers of this directory)
    with ``extra`` flags after them, into ``out``. RuntimeError with the compiler's message."""
    cc = _cc()
    r = subprocess.run([cc, *flags(name), *extra, "-I", str(SOURCES[name].parent), "-o", str(out), str(src), "-lm"],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{cc} failed: {r.stderr.strip()[:500]}")


def compile_variant(name: str, src: Path | str, out: Path | str, extra: tuple[str, ...] = ()) -> ctypes.CDLL:
    """Another source of kernel ``name`` (a variant for an A/B, or its own source with ``extra``
    flags, e.g. without AVX-512) built as the cached build is, into ``out`` (not cached), loaded.
    Its includes resolve beside ``src`` first, then in this directory."""
    _build(name, src, out, extra)
    return ctypes.CDLL(str(out))


def _compile(name: str) -> Path:
    src = SOURCES[name]
    _cc()                             # no compiler: no kernels, even where a build is cached
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
        _build(name, src, tmp)
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
