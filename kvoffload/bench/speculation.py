"""Self-speculative decoding against plain decoding with the same KV placement, side by side.

For each model and context length the document is prefilled once (all but its last token);
every run then truncates the sequence back to that prefix (``kv.truncate``), prefills the last
token and generates ``new_tokens`` tokens: plain decoding, or a speculation round loop for each
gamma, at each temperature, repetitions interleaved. Speculative runs first read the prefix
back to rebuild their draft policy's metadata (``reseed``, not timed: a real request builds it
during its prefill). Decode time is measured from the first token to the last; it includes
the draft cache rebuilds after the first.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import sys
import time
from dataclasses import dataclass

import torch

from kvoffload.config import KVConfig, ModelConfig, SamplingParams
from kvoffload.model.interface import ForwardBatch, Logits, Phase
from kvoffload.sampling import make_generator, sample
from kvoffload.speculative.speculator import SelfSpeculator


@dataclass(frozen=True)
class SpecBenchConfig:
    """lengths: context tokens. gammas: draft tokens per verification. temperatures: 0 =
    greedy. new_tokens: generated per run. reps: interleaved repetitions. host_share: the
    host RAM tier holds this share of the context's KV, the rest is on disk (``None``: all KV
    in RAM, no tiers). rebuilds: extra speculative configurations at ``rebuild_gamma``, greedy
    (name -> SpecConfig fields), to compare draft cache rebuild rules (the plain "window" rule
    rebuilds only when ``spec_draft_window`` verified tokens were appended). grid: every gamma
    at every temperature (else only plain and ``rebuild_gamma``, greedy, and the rebuild rules)."""

    lengths: tuple[int, ...] = (2048, 4096, 8192)
    gammas: tuple[int, ...] = (2, 4, 6, 8)
    temperatures: tuple[float, ...] = (0.0, 0.6)
    new_tokens: int = 96
    reps: int = 3
    host_share: float | None = 0.1
    seed: int = 0
    rebuild_gamma: int = 4
    grid: bool = True
    rebuilds: tuple[tuple[str, tuple[tuple[str, object], ...]], ...] = (
        ("no-rebuild", (("spec_draft_window", 1 << 20),)),
        ("interval-16", (("spec_rebuild_interval", 16),)),
        ("acceptance-0.7", (("spec_rebuild_acceptance", 0.7), ("spec_rebuild_rounds", 4))),
    )


@dataclass(frozen=True)
class Run:
    """One configuration of one repetition at one length."""

    name: str
    gamma: int                  # 0: plain decoding
    temperature: float
    rebuild: str


def document(tokenizer, n: int) -> list[int]:
    """The first ``n`` tokens of the King James Bible (a long natural document)."""
    from kvoffload.eval.corpora import kjv_verses

    text, ids, i = [], [], 0
    verses = kjv_verses()
    while len(ids) < n:
        text.append(" ".join(verses[i:i + 400]))
        i += 400
        ids = tokenizer.encode(" ".join(text))
    return ids[:n]


class SpecBench:
    def __init__(self, llm, cfg: SpecBenchConfig, length: int) -> None:
        self.llm, self.cfg, self.length = llm, cfg, length
        self.kv, self.engine, self.model = llm.engine.kv, llm.engine, llm.model
        self.prompt = document(llm.tokenizer, length)
        self.sid = 0
        self.capacity = length + cfg.new_tokens + max(cfg.gammas) + 2
        self.kv.allocate(self.sid, self.capacity)
        with torch.inference_mode():
            chunk = llm.config.prefill_chunk
            for s in range(0, length - 1, chunk):
                e = min(s + chunk, length - 1)
                self.engine._prefill(self.sid, self.prompt[s:e], s, Logits.NONE)

    def close(self) -> None:
        self.kv.free(self.sid)

    @staticmethod
    def runs_of(cfg: SpecBenchConfig) -> list[Run]:
        out = []
        for t in cfg.temperatures if cfg.grid else (0.0,):
            out.append(Run(f"plain T={t}", 0, t, ""))
            out += [Run(f"spec g={g} T={t}", g, t, "window") for g in (cfg.gammas if cfg.grid else (cfg.rebuild_gamma,))]
        out += [Run(f"spec g={cfg.rebuild_gamma} T=0.0 {name}", cfg.rebuild_gamma, 0.0, name) for name, _ in cfg.rebuilds]
        return out

    @torch.inference_mode()
    def run(self, r: Run, rep: int) -> dict:
        P, N = self.length, self.cfg.new_tokens
        params = SamplingParams(temperature=r.temperature, seed=self.cfg.seed + rep, max_tokens=N, ignore_eos=True)
        gen = make_generator(params, self.llm.device)
        self.kv.truncate(self.sid, P - 1)
        spec = None
        if r.gamma:
            extra = dict(dict(self.cfg.rebuilds).get(r.rebuild, ()))
            scfg = dataclasses.replace(self.llm.config.spec, speculate="self", num_speculative_tokens=r.gamma, **extra)
            spec = SelfSpeculator(self.model, self.kv, dataclasses.replace(self.llm.config, spec=scfg), self.llm.device)
            spec.reseed(self.sid, self.capacity, P - 1)
        t0 = time.perf_counter()
        logits = self.engine._prefill(self.sid, self.prompt[-1:], P - 1, Logits.LAST, spec.tap if spec else self.kv)
        out = sample(logits, [params], [gen])
        if spec is not None:
            spec.prefilled(self.sid, P)
        t1 = time.perf_counter()
        margins = []
        cached = P
        while len(out) < N:
            if spec is None:
                tok = torch.tensor([[out[-1]]], device=self.llm.device)
                batch = ForwardBatch(Phase.DECODE, (self.sid,), torch.tensor([[cached]], device=self.llm.device), (cached,))
                row = self.model(tok, batch, self.kv)                                    # [1, V]
                top = row[0].float().topk(2).values
                margins.append(float(top[0] - top[1]))
                out += sample(row, [params], [gen])
                cached += 1
            else:
                toks = spec.round((self.sid,), [out[-1]], [cached], self.capacity - cached, [params], [gen])[0]
                out += toks
                cached += len(toks)
        t2 = time.perf_counter()
        rec = {"length": P, "run": r.name,
               "gamma": r.gamma, "temperature": r.temperature, "rebuild": r.rebuild, "rep": rep,
               "tokens": out[:N], "decode_tokens": len(out) - 1, "decode_s": t2 - t1, "first_s": t1 - t0,
               "tok_s": (len(out) - 1) / (t2 - t1)}
        if spec is not None:
            st = spec.stats
            rec.update(acceptance=st.acceptance, mean_accepted=st.mean_accepted, verifications=st.rounds,
                       rebuilds={k: v for k, v in st.rebuilds.items() if v}, draft_s=st.draft_s,
                       verify_s=st.verify_s, rebuild_s=st.rebuild_s, draft_tokens=spec.draft.seqs[self.sid].base)
            spec.free(self.sid)
        else:
            rec["margins"] = margins
        return rec


def kv_host_budget(mcfg: ModelConfig, engine: dict, length: int, share: float) -> int:
    """Bytes of ``share`` of a ``length``-token context's KV (2-byte KV unless float32), at least
    one chunk (the tiers' unit)."""
    width = 4 if (engine.get("kv_dtype") or engine.get("dtype")) == "float32" else 2
    kv = KVConfig(**{k: v for k, v in engine.items() if k in ("block_size", "chunk_blocks")})
    chunk = kv.block_size * kv.chunk_blocks * mcfg.kv_bytes_per_token(width) // mcfg.num_layers
    return max(chunk, int(share * mcfg.kv_bytes_per_token(width) * length))


def run(model: str | None, cfg: SpecBenchConfig, engine: dict, out_dir: str, progress: bool = True) -> list[dict]:
    """Every run of ``cfg`` for one model; records appended to ``out_dir/runs.jsonl`` (a rerun
    skips the ones there)."""
    from tqdm import tqdm

    from kvoffload.api import LLM
    from kvoffload.model.loading import read_config
    from kvoffload.model.registry import resolve_model

    path = os.path.join(out_dir, "runs.jsonl")
    done = {}
    if os.path.exists(path):
        with open(path) as f:
            done = {_key(r): r for r in map(json.loads, filter(str.strip, f))}

    model_path = resolve_model(model)
    mcfg, name = read_config(model_path), os.path.basename(model_path)
    runs = SpecBench.runs_of(cfg)
    max_prompt = mcfg.max_position - cfg.new_tokens - max(cfg.gammas) - 2
    for length in (min(n, max_prompt) for n in cfg.lengths):    # the model's context bounds "8K"
        todo = [(rep, r) for rep in range(cfg.reps) for r in runs if (name, length, r.name, rep) not in done]
        if not todo:
            continue
        tiers = {} if cfg.host_share is None else {"kv_host_budget": kv_host_budget(mcfg, engine, length, cfg.host_share)}
        print(f"{name} at {length} tokens: prefill ({tiers or 'KV in RAM'})", file=sys.stderr)
        llm = LLM(model, **engine, **tiers)
        bench = SpecBench(llm, cfg, length)
        try:
            for rep, r in tqdm(todo, desc=f"{name} {length}", disable=not progress, file=sys.stderr):
                rec = {**bench.run(r, rep), "model": name, "placement": tiers or "memory"}
                done[_key(rec)] = rec
                with open(path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
        finally:
            bench.close()
            llm.close()
    return [r for r in done.values() if r["model"] == name]


def _key(rec: dict) -> tuple:
    return rec["model"], rec["length"], rec["run"], rec["rep"]


def summarize(records: list[dict]) -> list[dict]:
    """Per (model, length, run): medians over repetitions; ``speedup``: the median of each
    repetition's tok/s over the plain run's at the same temperature (measured side by side);
    greedy runs: how many repetitions produced exactly the plain greedy tokens, and where not,
    the plain run's top-1 / top-2 logit margin at the first difference (0 = a tie)."""
    plain = {(r["model"], r["length"], r["temperature"], r["rep"]): r for r in records if not r["gamma"]}
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["model"], r["length"], r["run"]), []).append(r)
    rows = []
    for (model, length, name), rs in groups.items():
        base = [plain.get((model, length, r["temperature"], r["rep"])) for r in rs]
        ratios = [r["tok_s"] / b["tok_s"] for r, b in zip(rs, base) if b]
        row = {"model": model, "length": length, "run": name, "gamma": rs[0]["gamma"],
               "temperature": rs[0]["temperature"], "rebuild": rs[0]["rebuild"], "reps": len(rs),
               "tok_s": statistics.median(r["tok_s"] for r in rs),
               "speedup": statistics.median(ratios) if ratios else None}
        if rs[0]["gamma"]:
            row.update(acceptance=statistics.mean(r["acceptance"] for r in rs),
                       mean_accepted=statistics.mean(r["mean_accepted"] for r in rs),
                       draft_tokens=rs[0]["draft_tokens"],
                       rebuilds=statistics.mean(sum(r["rebuilds"].values()) - 1 for r in rs))
            if rs[0]["temperature"] == 0:
                same, margins = 0, []
                for r, b in zip(rs, base):
                    if b is None:
                        continue
                    diff = next((i for i, (x, y) in enumerate(zip(r["tokens"], b["tokens"])) if x != y), None)
                    if diff is None:
                        same += 1
                    else:
                        margins.append(b["margins"][diff - 1] if diff > 0 else None)
                row.update(greedy_identical=same, divergence_margins=margins)
        rows.append(row)
    rows.sort(key=lambda x: (x["model"], x["length"], x["temperature"], x["rebuild"] != "" and x["rebuild"] != "window",
                             x["gamma"], x["rebuild"]))
    return rows


def markdown(rows: list[dict]) -> str:
    out = []
    for model in sorted({r["model"] for r in rows}):
        out.append(f"\n### {model}\n")
        out.append("| context | run | tok/s | speedup | acceptance | accepted / verification | draft cache | rebuilds | greedy = plain |")
        out.append("|---|---|---|---|---|---|---|---|---|")
        for r in (x for x in rows if x["model"] == model):
            cells = [str(r["length"]), r["run"], f"{r['tok_s']:.2f}",
                     f"{r['speedup']:.2f}x" if r["speedup"] is not None else ""]
            if r["gamma"]:
                cells += [f"{100 * r['acceptance']:.1f}%", f"{r['mean_accepted']:.2f}", str(r["draft_tokens"]),
                          f"{r['rebuilds']:.1f}"]
                if "greedy_identical" in r:
                    m = ", ".join("tie" if x == 0 else ("?" if x is None else f"{x:.3f}") for x in r["divergence_margins"])
                    cells.append(f"{r['greedy_identical']}/{r['reps']}" + (f" (margin at first difference: {m})" if m else ""))
                else:
                    cells.append("")
            else:
                cells += ["", "", "", "", ""]
            out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def write_report(records: list[dict], directory: str) -> str | None:
    """``summary.md`` / ``summary.json`` and ``speedup.png``; returns why there is no plot."""
    from kvoffload.eval.report import write_tables

    rows = summarize(records)
    plt, fig, axes, why = write_tables(directory, "summary", rows, markdown(rows))
    if plt is None:
        return why
    for ax, model in axes:
        for (length, temp) in sorted({(r["length"], r["temperature"]) for r in rows if r["model"] == model}):
            pts = sorted((r["gamma"], r["speedup"]) for r in rows if r["model"] == model and r["length"] == length
                         and r["temperature"] == temp and r["gamma"] and r["rebuild"] == "window")
            if pts:
                ax.plot(*zip(*pts), marker="o", linestyle="-" if temp == 0 else "--", label=f"{length} tok, T={temp}")
        ax.axhline(1.0, color="grey", linewidth=0.8)
        ax.set_title(model, fontsize=9)
        ax.set_xlabel("gamma (draft tokens per verification)")
        ax.set_ylabel("decode tok/s over plain (same placement)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(directory, "speedup.png"), dpi=110)
    plt.close(fig)
    return None
