"""Where kvoffload writes files of its own outside the offload and store directories.

One root, the cache: ``--cache-dir`` (``EngineConfig.cache_dir``) when given, else
``$KVOFFLOAD_CACHE``, else ``~/.cache/kvoffload``. It holds the assembled split models and, under
``kernels/``, the compiled native kernels. The disk workers get it through ``KVOFFLOAD_CACHE``.
"""

from __future__ import annotations

import os

_override: str | None = None


def default_cache_dir() -> str:
    """``$KVOFFLOAD_CACHE`` or ``~/.cache/kvoffload``."""
    return os.environ.get("KVOFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvoffload")


def set_cache_dir(path: str | None) -> None:
    """Make ``path`` this process's cache root (``None``: back to the default)."""
    global _override
    _override = os.path.abspath(os.path.expanduser(path)) if path else None


def cache_root() -> str:
    """The cache root in use."""
    return _override or default_cache_dir()
