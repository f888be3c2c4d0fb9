"""Fuzzing (#19), bounded in time: the CLI's flags with odd values, and the HF / GGUF header
parsers on arbitrary input. Whatever comes in: exit code 0 or 2 (a one-line error), never a
traceback, no offload files left."""

from __future__ import annotations

import contextlib
import gc
import io
import os
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvoffload.cli.main import main
from kvoffload.errors import KvoffloadError
from kvoffload.model.loader.gguf_loader import config_from_gguf, read_gguf_config
from kvoffload.model.loader.hf_loader import config_from_hf

ODD = ["-1", "0", "1", "2", "3", "16", "two", "1.5", "", "-5MiB", "1KiB", "none", "nan", "inf", "1e400", "1/16",
       "\udcff", "--", "-"]
FLAGS = {
    "--block-size": ODD, "--kv-chunk-blocks": ODD, "--kv-host-budget": ODD, "--kv-disk-budget": ODD,
    "--kv-tiers": ["host:none", "disk:none", "host:1KiB,disk:none", "tape:1", "host", "host:-1", "disk:0,disk:1"],
    "--disk-workers": ["-1", "0", "1", "2", "x"], "--disk-read-blocks": ODD, "--disk-io-depth": ODD,
    "--disk-worker-timeout": ["0", "-1", "nan", "30", "x"], "--disk-read-batch": ODD,
    "--sparse-policy": ["dense", "quest", "streaming", "shadowkv", "nope", ""], "--sparse-budget": ODD,
    "--sparse-dense-layers": ["0,1", "none", "-1", "x", "99"], "--temperature": ODD, "--top-k": ODD,
    "--top-p": ODD, "--seed": ODD, "--max-tokens": ["-1", "0", "1", "2", "x"], "--stop": ["", "x", "\n"],
    "--prefill-chunk": ODD, "--max-num-seqs": ODD, "--dtype": ["float32", "auto", "int3"],
    "--kv-dtype": ["float32", "bfloat16", "x"], "--threads": ["-1", "0", "1", "x"], "--speculate": ["none", "self", "x"],
    "--num-speculative-tokens": ODD, "--scheduling": ["interleave", "prefill-first", "x"],
}


@pytest.fixture(scope="module")
def model_path(tiny_hf):
    return tiny_hf("qwen2")[1]


@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(flags=st.lists(st.sampled_from(sorted(FLAGS)).flatmap(lambda f: st.tuples(st.just(f), st.sampled_from(FLAGS[f]))),
                      max_size=4),
       prompt=st.sampled_from(["hi", "x" * 40, "\udcff", ""]))
def test_cli_flags(model_path, tmp_path_factory, flags, prompt):
    offload = tmp_path_factory.mktemp("offload")
    argv = ["generate", "-m", model_path, "-p", prompt, "-n", "2", "--offload-dir", str(offload), "--dtype", "float32"]
    for f, v in flags:
        argv += [f, v]
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(argv)
        except SystemExit as e:          # argparse
            code = e.code
    gc.collect()                          # the LLM's disk tier (finalizer) goes with it
    assert code in (0, 2), (argv, err.getvalue())
    if code == 2:
        lines = [ln for ln in err.getvalue().splitlines() if ln and "left by killed runs" not in ln]
        assert len(lines) == 1 and lines[0].startswith("kvoffload: error: "), (argv, err.getvalue())
    assert os.listdir(offload) == [], argv
    shutil.rmtree(offload)


JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats() | st.text(max_size=8),
                    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner, max_size=3),
                    max_leaves=6)
HF_KEYS = ["model_type", "num_attention_heads", "hidden_size", "vocab_size", "intermediate_size", "num_hidden_layers",
           "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
           "max_position_embeddings", "tie_word_embeddings"]
VALID_HF = {"model_type": "llama", "num_attention_heads": 4, "hidden_size": 64, "vocab_size": 300,
            "intermediate_size": 96, "num_hidden_layers": 2, "num_key_value_heads": 2}
VALUES = st.one_of(JSON, st.sampled_from([0, -1, 1, 3, 2**40, 0.5, float("nan"), "4", None, "llama", "qwen2",
                                          {"rope_type": "llama3", "factor": 0}, {"type": "linear"}]))


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(changes=st.dictionaries(st.sampled_from(HF_KEYS), VALUES, max_size=4), whole=st.none() | JSON)
def test_hf_config_parser(changes, whole):
    raw = whole if whole is not None and not isinstance(whole, dict) else {**VALID_HF, **changes}
    try:
        cfg = config_from_hf(raw, "m")
    except KvoffloadError as e:
        assert "\n" not in str(e)
        return
    assert cfg.num_heads >= 1 and cfg.num_kv_heads >= 1 and cfg.head_dim >= 2


GGUF_KEYS = ["general.architecture", "llama.attention.head_count", "llama.embedding_length", "llama.vocab_size",
             "llama.feed_forward_length", "llama.block_count", "llama.attention.head_count_kv",
             "llama.attention.key_length", "llama.attention.layer_norm_rms_epsilon", "llama.rope.freq_base",
             "llama.context_length", "llama.rope.scaling.type", "llama.rope.scaling.factor", "tokenizer.ggml.tokens"]
VALID_GGUF = {"general.architecture": "llama", "llama.attention.head_count": 4, "llama.embedding_length": 64,
              "llama.vocab_size": 300, "llama.feed_forward_length": 96, "llama.block_count": 2}


@settings(max_examples=300, deadline=None, derandomize=True, database=None)
@given(changes=st.dictionaries(st.sampled_from(GGUF_KEYS), VALUES, max_size=4))
def test_gguf_metadata_parser(changes):
    try:
        cfg = config_from_gguf({**VALID_GGUF, **changes}, None, "m.gguf")
    except KvoffloadError as e:
        assert "\n" not in str(e)
        return
    assert cfg.num_heads >= 1 and cfg.num_kv_heads >= 1


@pytest.fixture(scope="module")
def gguf_bytes(tiny_hf, write_gguf, tmp_path_factory):
    path = str(tmp_path_factory.mktemp("gguf") / "tiny.gguf")
    write_gguf(tiny_hf("llama-linear-rope")[0], path, "llama")
    with open(path, "rb") as f:
        return f.read()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True, database=None)
@given(edits=st.lists(st.tuples(st.integers(0, 4095), st.integers(0, 255)), min_size=1, max_size=6),
       cut=st.none() | st.integers(0, 8192))
def test_gguf_file_header_parser(gguf_bytes, tmp_path_factory, edits, cut):
    """Bytes of a real GGUF's header changed, or the file cut short: a config or a one-line error."""
    data = bytearray(gguf_bytes if cut is None else gguf_bytes[:cut])
    for at, byte in edits:
        if at < len(data):
            data[at] = byte
    path = tmp_path_factory.mktemp("fz") / "f.gguf"
    path.write_bytes(bytes(data))
    try:
        read_gguf_config(str(path))
    except KvoffloadError as e:
        assert "\n" not in str(e)
