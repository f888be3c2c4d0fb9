"""Every sparse policy at every budget against dense, with the prefill shared.

A sparse policy acts on decode only (prefill is dense), so a sample is prefilled once, densely,
and each configuration then decodes from that same KV: the prefix buffers are shared (decode
writes only past the prompt, and the configurations run one after another), and each policy
builds its metadata from the prefilled keys and values exactly as it would have while
observing the prefill. Per sample and configuration:

* generation tasks (``passkey``, ``niah_*``...): greedy decode, scored as ``kvoffload eval``;
* ``agreement``: the last ``decode_tokens`` tokens of a KJV passage fed one by one; top-1
  agreement, KL(dense || sparse) and the NLL of those tokens (perplexity delta), against dense
  decoding of the same tokens;
* the bytes each configuration read: fraction of the dense KV and read amplification
  (tokens in the blocks read / tokens attended).

Decode speed is not measured here (``kvoffload bench``): this is an accuracy sweep.
Results go to ``DIR/sweep.jsonl`` (one line per sample and configuration; a rerun resumes),
``DIR/sweep.md`` / ``.json`` / ``.png``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch

from kvoffload.config import EngineConfig, SparseConfig
from kvoffload.errors import ConfigError, InputError
from kvoffload.eval import metrics
from kvoffload.eval.runner import model_name
from kvoffload.eval.tasks import SCORERS, get_task, make_sample, text_tokens
from kvoffload.model.interface import ForwardBatch, Logits, Phase

SWEEP_FILE = "sweep.jsonl"


@dataclass(frozen=True)
class SweepConfig:
    """policies: sparse policy names. budgets: ``--sparse-budget`` values. tasks, lengths,
    samples, seed, decode_tokens: as ``kvoffload eval``. calibration: channel file for
    ``double_sparsity``. output: result directory. chat: chat template for task prompts.
    max_new_tokens: cap on a generation task's output (default: the task's RULER budget; the
    answers come first, so a smaller cap saves decode time on models that ramble)."""

    policies: tuple[str, ...]
    budgets: tuple[str, ...]
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    samples: int = 3
    seed: int = 0
    decode_tokens: int = 64
    calibration: str | None = None
    output: str | None = None
    chat: bool = True
    max_new_tokens: int | None = None


def _configs(cfg: SweepConfig) -> list[tuple[str, str]]:
    return [(p, b) for p in cfg.policies for b in cfg.budgets]


class SharedPrefix:
    """A dense prefill kept so that several decode backends can start from it."""

    def __init__(self, llm, ids: list[int], capacity: int) -> None:
        from kvoffload.attention.dense import DenseBackend

        self.llm, self.P, self.capacity = llm, len(ids), capacity
        cfg = llm.model_config
        self.dense = DenseBackend(cfg, llm.device, llm.engine.kv.kv_dtype, block_size=llm.config.kv.block_size,
                                  chunk_blocks=llm.config.kv.chunk_blocks)
        self.dense.allocate(0, capacity)
        chunk = llm.config.prefill_chunk
        with torch.inference_mode():
            for s in range(0, self.P, chunk):
                e = min(s + chunk, self.P)
                batch = ForwardBatch(Phase.PREFILL, (0,), torch.arange(s, e, device=llm.device)[None], (s,),
                                     Logits.LAST if e == self.P else Logits.NONE)
                out = llm.model(torch.tensor([ids[s:e]], device=llm.device), batch, self.dense)
        self.last_logits = out[0]                                            # [V]

    def backend(self, sparse: SparseConfig | None):
        """A decode backend over the shared prefix: dense (``None``) or with a policy."""
        from kvoffload.attention.dense import DenseBackend
        from kvoffload.sparse import make_policy

        llm = self.llm
        policy = None if sparse is None else make_policy(sparse, llm.model_config, llm.config.kv.block_size, llm.device)
        be = DenseBackend(llm.model_config, llm.device, self.dense.kv_dtype, policy=policy,
                          block_size=llm.config.kv.block_size, chunk_blocks=llm.config.kv.chunk_blocks)
        be.share(0, self.dense, self.P)
        return be

    def step(self, backend, token: int, pos: int) -> torch.Tensor:
        batch = ForwardBatch(Phase.DECODE, (0,), torch.tensor([[pos]], device=self.llm.device), (pos,))
        return self.llm.model(torch.tensor([[token]], device=self.llm.device), batch, backend)[0]   # [V]


def greedy(prefix: SharedPrefix, backend, max_tokens: int) -> list[int]:
    eos = prefix.llm.tokenizer.eos_ids
    tok = int(prefix.last_logits.argmax())
    out = [tok]
    with torch.inference_mode():
        while len(out) < max_tokens and tok not in eos:
            tok = int(prefix.step(backend, tok, prefix.P + len(out) - 1).argmax())
            out.append(tok)
    return [t for t in out if t not in eos]


def forced(prefix: SharedPrefix, backend, ids: list[int]) -> torch.Tensor:
    """``[N, V]`` logits predicting ``ids[P:]`` (the last prefill position's, then each decode's)."""
    rows = [prefix.last_logits]
    with torch.inference_mode():
        for i in range(prefix.P, len(ids) - 1):
            rows.append(prefix.step(backend, ids[i], i))
    return torch.stack(rows)


def run_sample(llm, cfg: SweepConfig, task_name: str, length: int, index: int, todo: list[tuple[str, str]],
               ) -> list[dict]:
    """Every configuration in ``todo`` (and dense) on one sample."""
    task = get_task(task_name)
    # (the engine's other sparse settings, e.g. --sparse-rank, apply to every configuration)
    sparse = {c: dataclasses.replace(llm.config.sparse, sparse_policy=c[0], sparse_budget=c[1],
                                     sparse_calibration=cfg.calibration) for c in todo}
    out = []
    if task.kind == "generate":
        sample = make_sample(task, llm.tokenizer, length, index, cfg.seed, None, cfg.chat)
        budget = min(task.tokens_to_generate, cfg.max_new_tokens or task.tokens_to_generate)
        prefix = SharedPrefix(llm, sample.prompt_ids, len(sample.prompt_ids) + budget)
        ref = llm.tokenizer.decode(greedy(prefix, prefix.backend(None), budget))
        ref_score = SCORERS[task.metric](ref, sample.answers)
        for c in todo:
            be = prefix.backend(sparse[c])
            t0 = time.perf_counter()
            text = llm.tokenizer.decode(greedy(prefix, be, budget))
            out.append({"policy": c[0], "budget": c[1], "max_new_tokens": budget,
                        "score": SCORERS[task.metric](text, sample.answers),
                        "dense_score": ref_score, "same_as_dense": text == ref, "output": text,
                        **_read(be), "seconds": round(time.perf_counter() - t0, 3)})
        return out
    ids = text_tokens(llm.tokenizer, length, index, cfg.seed)
    P = max(1, length - cfg.decode_tokens)
    prefix = SharedPrefix(llm, ids[:P], length)
    target = torch.tensor(ids[P:])
    ref = forced(prefix, prefix.backend(None), ids)
    ref_nll = float(metrics.token_nll(ref, target).double().sum())
    for c in todo:
        be = prefix.backend(sparse[c])
        t0 = time.perf_counter()
        run = forced(prefix, be, ids)
        agree, kl = metrics.agreement(run, ref)
        out.append({"policy": c[0], "budget": c[1], "tokens": len(target), "agree": float(agree.float().mean()),
                    "kl": float(kl.mean()), "nll_sum": float(metrics.token_nll(run, target).double().sum()),
                    "dense_nll_sum": ref_nll, **_read(be), "seconds": round(time.perf_counter() - t0, 3)})
    return out


def _read(backend) -> dict:
    st = backend.stats().sparse
    return {"read_fraction": round(st.read_fraction, 5), "amplification": round(st.amplification, 4),
            "read_bytes_per_layer_step": st.read * st.bytes_per_token // max(1, st.steps)}


def run(cfg: SweepConfig, engine_cfg: EngineConfig, progress: bool = True) -> list[dict]:
    from tqdm import tqdm

    from kvoffload.api import LLM
    from kvoffload.dtypes import QUANT

    if engine_cfg.kv_dtype in QUANT:                   # its policies share one in-memory (dense) prefill
        raise ConfigError(f"kvoffload sweep runs over an in-memory full-precision KV: --kv-dtype {engine_cfg.kv_dtype} "
                          "is not supported there (compare it with kvoffload eval)")
    if "double_sparsity" in cfg.policies and not cfg.calibration:
        raise ConfigError("double_sparsity needs --sparse-calibration FILE (write one with `kvoffload calibrate`)")
    from kvoffload.sparse import policy_class

    for p, b in _configs(cfg):
        policy_class(p)
        SparseConfig(sparse_policy=p, sparse_budget=b)
    model = model_name(engine_cfg)
    records: list[dict] = []
    path = os.path.join(cfg.output, SWEEP_FILE) if cfg.output else None
    if path and os.path.exists(path):
        with open(path) as f:
            records = [json.loads(line) for line in f if line.strip()]
    done = {(r["model"], r["task"], r["length"], r["index"], r["policy"], r["budget"]) for r in records}
    jobs = []
    for index in range(cfg.samples):
        for task in cfg.tasks:
            for length in cfg.lengths:
                todo = [c for c in _configs(cfg) if (model, task, length, index, *c) not in done]
                if todo:
                    jobs.append((task, length, index, todo))
    if not jobs:
        return records
    llm = LLM(config=engine_cfg)
    if max(cfg.lengths) > llm.model_config.max_position:
        raise InputError(f"length {max(cfg.lengths)} is beyond the context of {model}")
    bar = tqdm(total=len(jobs), desc=f"sweep {model}", unit="sample", disable=not progress, file=sys.stderr)
    for task, length, index, todo in jobs:
        bar.set_postfix_str(f"{task} @ {length} #{index}")
        for r in run_sample(llm, cfg, task, length, index, todo):
            rec = {"model": model, "task": task, "length": length, "index": index, "seed": cfg.seed, **r}
            records.append(rec)
            if path:
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        bar.update()
    bar.close()
    llm.close()
    return records


# --------------------------------------------------------------------------- report

def _budget_value(b: str) -> float:
    from kvoffload.config import parse_budget

    return parse_budget(b)[1]


def summarize(records: list[dict]) -> list[dict]:
    """One row per (model, policy, budget, length): mean task scores (0..100) and agreement metrics."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["policy"], r["budget"], r["length"]), []).append(r)
    rows = []
    for (model, policy, budget, length), rs in groups.items():
        row = {"model": model, "policy": policy, "budget": budget, "length": length}
        for task in sorted({r["task"] for r in rs}):
            ts = [r for r in rs if r["task"] == task]
            if "score" in ts[0]:
                row[task] = sum(r["score"] for r in ts) / len(ts)              # scorers give 0..100
                row[f"{task}_dense"] = sum(r["dense_score"] for r in ts) / len(ts)
            else:
                n = sum(r["tokens"] for r in ts)
                row["agree"] = 100 * sum(r["agree"] * r["tokens"] for r in ts) / n
                row["kl"] = sum(r["kl"] * r["tokens"] for r in ts) / n
                row["ppl_delta"] = math.exp(sum(r["nll_sum"] for r in ts) / n) - math.exp(sum(r["dense_nll_sum"] for r in ts) / n)
        row["read_fraction"] = sum(r["read_fraction"] for r in rs) / len(rs)
        row["amplification"] = sum(r["amplification"] for r in rs) / len(rs)
        row["samples"] = len(rs)
        rows.append(row)
    rows.sort(key=lambda r: (r["model"], r["policy"], -_budget_value(r["budget"]), r["length"]))
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for model in sorted({r["model"] for r in rows}):
        tasks = sorted({k for r in rows if r["model"] == model for k in r if k.endswith("_dense")})
        tasks = [t[:-len("_dense")] for t in tasks]
        out.append(f"\n### {model}\n")
        head = ["policy", "budget", "length"] + [f"{t} (dense)" for t in tasks] + \
               ["agree %", "KL", "ppl delta", "read", "ampl."]
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for r in (x for x in rows if x["model"] == model):
            cells = [r["policy"], r["budget"], f"{r['length'] // 1024}K" if r["length"] % 1024 == 0 else str(r["length"])]
            cells += [f"{r[t]:.0f} ({r[t + '_dense']:.0f})" if t in r else "" for t in tasks]
            cells += [f"{r['agree']:.1f}" if "agree" in r else "", f"{r['kl']:.4f}" if "kl" in r else "",
                      f"{r['ppl_delta']:+.3f}" if "ppl_delta" in r else "",
                      f"{100 * r['read_fraction']:.1f}%", f"{r['amplification']:.2f}"]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(records: list[dict], directory: str) -> str | None:
    """``sweep.md`` and ``sweep.json`` (and ``sweep.png`` when matplotlib is there); returns
    why there is no plot."""
    from kvoffload.eval.report import write_tables

    rows = summarize(records)
    plt, fig, axes, why = write_tables(directory, "sweep", rows, markdown(rows))
    if plt is None:
        return why
    for ax, model in axes:
        for policy in sorted({r["policy"] for r in rows if r["model"] == model}):
            mine = [r for r in rows if r["model"] == model and r["policy"] == policy and "agree" in r]
            pts = []                                   # one point per budget: mean over the lengths
            for budget in {r["budget"] for r in mine}:
                rs = [r for r in mine if r["budget"] == budget]
                pts.append((sum(r["read_fraction"] for r in rs) / len(rs), sum(r["agree"] for r in rs) / len(rs)))
            if pts:
                pts.sort()
                ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", label=policy)
        ax.set_xscale("log")
        ticks = [0.03, 0.06, 0.125, 0.25, 0.5, 1.0]
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("fraction of the KV read per decode step (budgets 1/32..1/4, mean over lengths)")
        ax.set_ylabel("next-token agreement with dense, %")
        ax.set_title(model)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "sweep.png"), dpi=110)
    plt.close(fig)
    return None
