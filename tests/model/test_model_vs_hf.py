"""Our model against HF transformers' implementation of the same weights (fp32)."""

from __future__ import annotations

import pytest
import torch

from kvoffload.attention.dense import DenseBackend
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.model.loading import build_model, read_checkpoint
from tests.conftest import TINY_ARCHS

CPU = torch.device("cpu")


def run_ours(model, tokens: torch.Tensor, chunks: list[int] | None = None) -> torch.Tensor:
    """[T] tokens -> [T, V] logits, prefilled in the given chunk sizes, the last token decoded."""
    T = tokens.shape[0]
    be = DenseBackend(model.cfg, CPU, torch.float32)
    be.allocate(0, T)
    bounds, start, sizes = [], 0, list(chunks or [T - 1])
    while start < T - 1:                 # the sizes in turn, the last one repeated
        c = sizes.pop(0) if len(sizes) > 1 else sizes[0]
        bounds.append((start, min(T - 1, start + c)))
        start = bounds[-1][1]
    out = []
    with torch.inference_mode():
        for a, b in bounds:
            batch = ForwardBatch(Phase.PREFILL, (0,), torch.arange(a, b)[None], (a,), Logits.ALL)
            out.append(model(tokens[None, a:b], batch, be)[0])
        batch = ForwardBatch(Phase.DECODE, (0,), torch.tensor([[T - 1]]), (T - 1,), Logits.ALL)
        out.append(model(tokens[None, T - 1:], batch, be)[0])
    return torch.cat(out)


def assert_close_to_hf(ours: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    diff = (ours - ref).abs()
    scale = ref.abs().max().item()
    print(f"{what}: max |diff| {diff.max().item():.3e}, mean {diff.mean().item():.3e}, logit scale {scale:.2f}")
    assert diff.max().item() <= 1e-4 * max(1.0, scale), what


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
@pytest.mark.parametrize("chunks", [None, [7, 16, 100]], ids=["one-chunk", "chunked"])
def test_tiny_hf_dir_logits_match_transformers(tiny_hf, arch, chunks):
    hf, path = tiny_hf(arch)
    model = build_model(read_checkpoint(path, torch.float32), CPU)
    tokens = torch.randint(0, 256, (90,), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
    assert_close_to_hf(run_ours(model, tokens, chunks), ref, f"{arch} {chunks}")


@pytest.mark.parametrize("arch", ["mistral", "qwen2"])
def test_tiny_gguf_logits_match_transformers(tiny_gguf, arch):
    """GGUF path: llama.cpp's q/k permutation undone (mistral = llama arch), Qwen2 biases."""
    hf, path = tiny_gguf(arch)
    ckpt = read_checkpoint(path, torch.float32)
    assert ckpt.file_format == "gguf" and ckpt.config.qkv_bias == (arch == "qwen2")
    model = build_model(ckpt, CPU)
    tokens = torch.randint(0, 256, (50,), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
    assert_close_to_hf(run_ours(model, tokens, [20, 20]), ref, f"gguf {arch}")


@pytest.fixture(scope="module")
def smollm2_pair(smollm2_gguf):
    import os

    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(os.path.dirname(smollm2_gguf), gguf_file=os.path.basename(smollm2_gguf),
                                              dtype=torch.float32).eval()
    ours = build_model(read_checkpoint(smollm2_gguf, torch.float32), CPU)
    return hf, ours


@pytest.mark.slow
def test_smollm2_gguf_logits_match_transformers(smollm2_pair):
    hf, ours = smollm2_pair
    tokens = torch.randint(0, 49152, (96,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = hf(tokens[None]).logits[0]
    assert_close_to_hf(run_ours(ours, tokens, [40, 40]), ref, "SmolLM2 GGUF")


@pytest.mark.slow
def test_smollm2_greedy_32_tokens_match_transformers(smollm2_pair):
    from kvoffload.config import EngineConfig, SamplingParams
    from kvoffload.engine.engine import Engine

    hf, ours = smollm2_pair
    prompt = [504, 3458, 282, 4649, 314, 216, 3, 1226, 549, 253]   # arbitrary ids
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False,
                          eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()

    class NoStop:   # the engine only needs stop ids and a detokenizer from the tokenizer
        eos_ids = frozenset()

        @staticmethod
        def stream_decoder():
            return type("D", (), {"push": staticmethod(lambda t: ""), "flush": staticmethod(lambda: "")})()

    eng = Engine(ours, DenseBackend(ours.cfg, CPU, torch.float32), NoStop(), EngineConfig(prefill_chunk=4), CPU)
    sid = eng.add_request(prompt, SamplingParams(max_tokens=32))
    while eng.has_unfinished():
        eng.step()
    assert eng.pop_finished(sid).output_ids == ref


@pytest.mark.parametrize("arch", sorted(TINY_ARCHS))
def test_tiny_greedy_32_tokens_match_transformers(tiny_hf, arch):
    from kvoffload.api import LLM
    from kvoffload.config import SamplingParams

    hf, path = tiny_hf(arch)
    prompt = list(range(40, 60))
    with torch.no_grad():
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, eos_token_id=None, do_sample=False,
                          pad_token_id=0)[0, len(prompt):].tolist()
    llm = LLM(path, dtype="float32", prefill_chunk=7)
    out = llm.generate(prompt, SamplingParams(max_tokens=32, ignore_eos=True))[0]
    assert out.token_ids == ref
