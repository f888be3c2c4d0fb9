"""Run the tests on every engine, interleaved, and collect a :class:`Report`."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import psutil
import torch

from kvoffload.bench.peers import LlamaCpp, Ours, PeerUnavailable, Transformers
from kvoffload.bench.report import Report
from kvoffload.bench.workloads import BenchTest

FILLER = ("The history of the region is long and varied. Farmers grew wheat and barley along the river, "
          "merchants carried salt and cloth over the mountain passes, and scholars copied books by hand in "
          "quiet monasteries. Each generation left its mark in stone, in law and in song. ")

PEERS = ("llama.cpp", "transformers")


@dataclass(frozen=True)
class BenchConfig:
    """One ``kvoffload bench`` speed run. ``reps``: repetitions of every test on every engine,
    engines interleaved. ``prefill_once``: a decode test prefills each engine once and each
    repetition is a round of n more tokens on that context, the engines' rounds alternating
    (order reversed every other round), so each pair of samples is taken seconds apart and a
    repetition costs no prefill; the context grows by n a round."""

    model: str | None
    tests: tuple[BenchTest, ...]
    reps: int = 3
    threads: int = 2
    vs: tuple[str, ...] = ()
    dtype: str = "auto"
    quantization: str = "auto"
    hf_dtype: str = "bfloat16"
    configs: tuple[tuple[str, dict], ...] = ()     # more kvoffload engines: (name, engine settings)
    prefill_once: bool = False


def _rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def build_engines(cfg: BenchConfig, path: str, n_ctx: int, report: Report) -> list:
    engines = []
    specs = [("kvoffload", lambda: Ours("kvoffload", path, cfg.threads, dtype=cfg.dtype,
                                         quantization=cfg.quantization))]
    for name, settings in cfg.configs:
        specs.append((name, lambda name=name, settings=settings: Ours(
            name, path, cfg.threads, **{"dtype": cfg.dtype, "quantization": cfg.quantization, **settings})))
    for peer in cfg.vs:
        if peer == "llama.cpp":
            specs.append((peer, lambda: LlamaCpp("llama.cpp", path, n_ctx, cfg.threads)))
        elif peer == "transformers":
            dt = {"bfloat16": torch.bfloat16, "float32": torch.float32}[cfg.hf_dtype]
            specs.append((f"transformers-{cfg.hf_dtype}", lambda dt=dt: Transformers(
                f"transformers-{cfg.hf_dtype}", path, dt)))
    for name, make in specs:
        before, t0 = _rss_mib(), time.perf_counter()
        try:
            eng = make()
        except PeerUnavailable as e:
            report.skipped[name] = str(e)
            print(f"skipping {name}: {e}", file=sys.stderr)
            continue
        report.rss_mib[eng.name] = _rss_mib() - before
        report.load_s[eng.name] = time.perf_counter() - t0
        report.labels[eng.name] = eng.label
        report.engines.append(eng.name)
        engines.append(eng)
    return engines


def prompts_for(tokenizer, test: BenchTest, limit: int) -> list[list[int]]:
    """``batch`` prompts of the test's length (pp: n, tg: depth), distinct per sequence."""
    n = test.n if test.kind == "pp" else max(test.depth, 1)
    n = min(n, limit)
    base = tokenizer.encode(FILLER * (n // 40 + 2))
    while len(base) < n + test.batch:
        base += base
    return [base[i:i + n] for i in range(test.batch)]


def run(cfg: BenchConfig, progress: bool = True) -> Report:
    from kvoffload.model.loading import peak_rss_bytes, read_config
    from kvoffload.model.registry import resolve_model

    torch.set_num_threads(cfg.threads)
    path = resolve_model(cfg.model)
    mcfg = read_config(path)
    report = Report(model=path, threads=cfg.threads, reps=cfg.reps, engines=[], labels={}, skipped={}, rss_mib={},
                    prefill_once=cfg.prefill_once)
    longest = max(t.context + _grows(cfg, t) for t in cfg.tests)
    engines = build_engines(cfg, path, min(mcfg.max_position, longest + 16), report)
    ours = engines[0]
    warm = BenchTest("tg", 4, 64, 1)
    for e in engines:                                            # warm-up: kernel builds, allocators
        e.run(warm, prompts_for(ours.llm.tokenizer, warm, mcfg.max_position))
    from tqdm import tqdm

    bar = tqdm(total=len(cfg.tests) * cfg.reps * len(engines), desc="bench", disable=not progress, file=sys.stderr)
    for test in cfg.tests:
        limit = mcfg.max_position - (test.n + 1 + _grows(cfg, test) if test.kind == "tg" else 1)
        prompts = prompts_for(ours.llm.tokenizer, test, limit)
        if cfg.prefill_once and test.kind == "tg":
            _rounds(cfg, test, prompts, engines, report, bar)
            continue
        for _ in range(cfg.reps):
            for e in engines:                                    # interleaved A/B/C
                report.add(test, e.name, e.run(test, prompts))
                bar.update()
    bar.close()
    report.peak_rss_mib = peak_rss_bytes() / 2**20
    return report


def _grows(cfg: BenchConfig, test: BenchTest) -> int:
    """Tokens a decode test's context grows by after its first repetition (--prefill-once)."""
    return test.n * (cfg.reps - 1) if cfg.prefill_once and test.kind == "tg" else 0


def _rounds(cfg: BenchConfig, test: BenchTest, prompts: list[list[int]], engines: list, report: Report, bar) -> None:
    """A decode test as rounds on one prefill per engine (untimed), the engines alternating."""
    decs = []
    try:
        for e in engines:
            bar.set_postfix_str(f"{test.name}: prefilling {e.name}")
            decs.append((e, e.start(test, prompts, cfg.reps)))
        bar.set_postfix_str("")
        for r in range(cfg.reps):
            for e, d in decs if r % 2 == 0 else decs[::-1]:
                report.add(test, e.name, d.round())
                bar.update()
    finally:
        for _, d in decs:
            d.close()
