"""Run tasks at several lengths for one engine configuration; one JSONL line per finished sample.

A run's samples are appended to ``OUTPUT/samples.jsonl`` as they finish, so a killed run resumes
where it stopped: a sample whose key (configuration label, model, task, length, index and the
settings that change its text) is already in the file is not run again. Several configurations
(different ``--label``) may share one output directory; the report combines them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
import typing

from kvoffload.config import EngineConfig, SamplingParams, parse_overrides
from kvoffload.errors import ConfigError, InputError
from kvoffload.eval import metrics
from kvoffload.eval.config import EvalConfig
from kvoffload.eval.report import Report
from kvoffload.eval.tasks import SCORERS, get_task, make_sample, text_tokens

SAMPLES_FILE = "samples.jsonl"
# Engine fields that say which model runs where, not how: they never name a configuration.
IDENTITY_FIELDS = ("model", "device", "threads", "cache_dir")
# The agreement reference keeps the run's model and numerics; every other engine field (attention
# policy, budgets, KV placement, batching...) is at its default, i.e. dense attention in memory.
REFERENCE_KEEPS = IDENTITY_FIELDS + ("dtype", "quantization", "quant_max_rows", "kv_dtype", "prefill_chunk")


def _flat(obj: typing.Any) -> dict[str, typing.Any]:
    """Field name -> value of a config dataclass, nested config dataclasses (e.g. ``kv``) flattened."""
    out = {}
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        out.update(_flat(v) if dataclasses.is_dataclass(v) else {f.name: v})
    return out


def non_default(cfg: EngineConfig, skip: tuple[str, ...] = IDENTITY_FIELDS) -> dict[str, typing.Any]:
    """Engine settings (nested ones included) that differ from their defaults, identity fields left out."""
    default = _flat(EngineConfig())
    return {k: v for k, v in _flat(cfg).items() if k not in skip and v != default[k]}


def config_label(cfg: EngineConfig) -> str:
    """``dense`` or ``field=value,...`` of the non-default engine settings."""
    nd = non_default(cfg)
    return ",".join(f"{k}={v}" for k, v in nd.items()) if nd else "dense"


def model_name(cfg: EngineConfig) -> str:
    from kvoffload.model.registry import DEFAULT_MODEL

    m = cfg.model or DEFAULT_MODEL
    return os.path.basename(m.rstrip("/")) if os.sep in m else m


def reference_config(cfg: EngineConfig, overrides: tuple[str, ...] = ()) -> EngineConfig:
    """The dense reference for ``cfg``: its model and numerics, every other setting at its default."""
    flat = _flat(cfg)
    values = {k: flat[k] for k in REFERENCE_KEEPS}
    values.update(parse_overrides(overrides, "--reference"))
    return EngineConfig().replace(**values)


# --------------------------------------------------------------------------- the resume log

class SampleLog:
    """``samples.jsonl``: one complete JSON object per finished sample, appended and flushed."""

    def __init__(self, directory: str | None) -> None:
        self.path = os.path.join(directory, SAMPLES_FILE) if directory else None
        self.records: list[dict] = []
        if self.path and os.path.exists(self.path):
            with open(self.path, encoding="utf-8") as f:
                lines = f.read().split("\n")
            for i, line in enumerate(lines):
                if not line.strip():
                    continue
                try:
                    self.records.append(json.loads(line))
                except json.JSONDecodeError:
                    if i < len(lines) - 1 and any(x.strip() for x in lines[i + 1:]):
                        raise InputError(f"{self.path}: line {i + 1} is not JSON") from None
                    # a run killed mid-write leaves at most a torn last line: it is redone
            if lines and lines[-1].strip():       # torn tail: cut it so the next append starts a line
                with open(self.path, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in self.records)
        self.keys = {r["key"] for r in self.records}

    def append(self, record: dict) -> None:
        self.records.append(record)
        self.keys.add(record["key"])
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
                f.flush()
                os.fsync(f.fileno())


def check_output_dir(directory: str) -> None:
    """Create ``directory`` if needed and make sure we can write there (before any model is loaded)."""
    try:
        os.makedirs(directory, exist_ok=True)
        probe = os.path.join(directory, f".write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.unlink(probe)
    except OSError as e:
        raise ConfigError(f"--output: cannot write to {directory}: {e.strerror or e}") from None


# --------------------------------------------------------------------------- one sample

def _key(*parts: typing.Any) -> str:
    return "|".join(str(p) for p in parts)


def run_generate(llm, task, cfg: EvalConfig, length: int, index: int) -> dict:
    sample = make_sample(task, llm.tokenizer, length, index, cfg.seed, cfg.depth if task.needles else None,
                         not cfg.no_chat)
    out = llm.generate(sample.prompt_ids, SamplingParams(max_tokens=task.tokens_to_generate))[0]
    return {"prompt_tokens": len(sample.prompt_ids), "units": sample.units, "depths": list(sample.depths),
            "answers": list(sample.answers), "output": out.text, "score": SCORERS[task.metric](out.text, sample.answers)}


def run_ppl(llm, cfg: EvalConfig, length: int, index: int) -> dict:
    import torch

    ids = text_tokens(llm.tokenizer, length, index, cfg.seed)
    logits = llm.engine.prompt_logits(ids)                                   # [T, V]
    nll = metrics.token_nll(logits[:-1], torch.tensor(ids[1:]))              # [T-1]
    return {"tokens": len(ids) - 1, "nll_sum": float(nll.double().sum())}


def run_agreement(llm, ref_engine, cfg: EvalConfig, length: int, index: int) -> dict:
    import torch

    ids = text_tokens(llm.tokenizer, length, index, cfg.seed)
    prefill = max(1, length - cfg.decode_tokens)
    run = llm.engine.teacher_forced_logits(ids, prefill)                     # [T-P, V]
    ref = ref_engine.teacher_forced_logits(ids, prefill)                     # [T-P, V]
    agree, kl = metrics.agreement(run, ref)                                  # [T-P], [T-P]
    nll = metrics.token_nll(run, torch.tensor(ids[prefill:]))                # [T-P]
    return {"first_position": prefill, "tokens": len(ids) - prefill,
            "agree": "".join("1" if a else "0" for a in agree.tolist()),
            "kl": [float(f"{x:.4g}") for x in kl.tolist()], "nll_sum": float(nll.double().sum())}


# --------------------------------------------------------------------------- the run

def run(cfg: EvalConfig, engine_cfg: EngineConfig, progress: bool = True) -> Report:
    """Run every missing sample of ``cfg`` with ``engine_cfg``; returns the report of the whole log."""
    if cfg.output:
        check_output_dir(cfg.output)
    label = cfg.label or config_label(engine_cfg)
    model = model_name(engine_cfg)
    ref_cfg = reference_config(engine_cfg, cfg.reference) if "agreement" in cfg.tasks else None
    log = SampleLog(cfg.output)
    settings = non_default(engine_cfg)
    for r in log.records:
        if r["label"] == label and r["model"] == model and r["engine"] != json.loads(json.dumps(settings)):
            raise ConfigError(f"label {label!r} in {cfg.output} was recorded with engine settings {r['engine']}, "
                              f"not {settings}: choose another --label")

    jobs = []        # sample index outermost: a run stopped early still covers every (task, length) evenly
    for index in range(cfg.samples):
        for task in map(get_task, cfg.tasks):
            for length in cfg.lengths:
                key = _key(label, model, task.name, length, index, cfg.seed,
                           cfg.depth if task.needles else "-", "plain" if cfg.no_chat else "chat",
                           f"{config_label(ref_cfg)}/{cfg.decode_tokens}" if task.kind == "agreement" else "-")
                if key not in log.keys:
                    jobs.append((task, length, index, key))
    if jobs:
        _run_jobs(cfg, engine_cfg, ref_cfg, label, model, settings, jobs, log, progress)
    return Report(log.records)


def _run_jobs(cfg, engine_cfg, ref_cfg, label, model, settings, jobs, log, progress) -> None:
    from tqdm import tqdm

    from kvoffload.api import LLM
    from kvoffload.engine.engine import Engine

    llm = LLM(config=engine_cfg)
    context = llm.model_config.max_position
    too_long = [n for n in cfg.lengths if n > context]
    if too_long:
        raise InputError(f"length {too_long[0]} is beyond the context of {model} ({context} tokens)")
    for task in dict.fromkeys(t for t, *_ in jobs):             # too-short lengths fail before any sample runs
        if task.kind == "generate":
            for length in cfg.lengths:
                make_sample(task, llm.tokenizer, length, 0, cfg.seed, None, not cfg.no_chat)
    ref_engine: Engine | None = None
    if ref_cfg is not None:
        # The run's own engine when the settings are the same (then a second, independent pass).
        ref_engine = llm.engine if ref_cfg == engine_cfg else LLM(config=ref_cfg).engine
    bar = tqdm(total=len(jobs), desc=f"eval {model} {label}", unit="sample", disable=not progress, file=sys.stderr)
    for task, length, index, key in jobs:
        bar.set_postfix_str(f"{task.name} @ {length}")
        t0 = time.perf_counter()
        if task.kind == "generate":
            result = run_generate(llm, task, cfg, length, index)
        elif task.kind == "ppl":
            result = run_ppl(llm, cfg, length, index)
        else:
            result = run_agreement(llm, ref_engine, cfg, length, index)
        record = {"key": key, "label": label, "model": model, "engine": settings, "task": task.name,
                  "kind": task.kind, "length": length, "index": index, "seed": cfg.seed,
                  "depth": cfg.depth if task.needles else None, "chat": not cfg.no_chat,
                  "reference": config_label(ref_cfg) if task.kind == "agreement" else None,
                  **result, "seconds": round(time.perf_counter() - t0, 3)}
        log.append(record)
        bar.update()
    bar.close()


def write_outputs(report: Report, directory: str) -> str | None:
    """``results.md``, ``results.json`` and ``results.png`` written atomically; returns why there is no plot."""
    from kvoffload.eval.report import atomic_write

    atomic_write(os.path.join(directory, "results.md"), report.markdown().encode())
    atomic_write(os.path.join(directory, "results.json"), report.to_json().encode())
    return report.plot(os.path.join(directory, "results.png"))

