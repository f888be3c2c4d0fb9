"""Combine sample records into a table (markdown), JSON and a plot of score against length.

One row per (task, metric, model, configuration), one column per length. Generation tasks show
RULER's score (0-100, mean over samples); ``ppl`` the perplexity over all scored tokens;
``agreement`` the top-1 agreement with the reference (% of positions), the mean KL(ref || run)
in nats and the run's perplexity over the decoded tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections import defaultdict
from dataclasses import asdict, dataclass

from kvoffload.eval import corpora, metrics
from kvoffload.eval.tasks import TASKS
from kvoffload.plotting import pyplot

# (task kind) -> metrics shown, with their format
METRICS = {"generate": (("score", "{:.1f}"),),
           "ppl": (("ppl", "{:.3f}"),),
           "agreement": (("top-1 %", "{:.2f}"), ("KL", "{:.2e}"), ("ppl (decoded)", "{:.3f}"))}


def write_tables(directory: str, stem: str, rows: list[dict], md: str):
    """``stem.md`` and ``stem.json`` in ``directory``, then one matplotlib figure with an axis per
    model of ``rows``: ``(plt, fig, [(axis, model)], None)``, or ``(None, None, [], why)`` when
    matplotlib is missing."""
    atomic_write(os.path.join(directory, f"{stem}.md"), md.encode())
    atomic_write(os.path.join(directory, f"{stem}.json"), json.dumps(rows, indent=1).encode())
    plt, why = pyplot()
    if plt is None:
        return None, None, [], why
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4), squeeze=False)
    return plt, fig, list(zip(axes[0], models)), None


def atomic_write(path: str, data: bytes) -> None:
    """Write via a temporary file in the same directory and rename: never a half-written file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.splitext(path)[1])
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def fmt_length(n: int) -> str:
    return f"{n // 1024}K" if n % 1024 == 0 else str(n)


@dataclass(frozen=True)
class Cell:
    task: str
    metric: str
    model: str
    config: str
    length: int
    value: float
    samples: int


def _aggregate(kind: str, recs: list[dict]) -> dict[str, float]:
    if kind == "generate":
        return {"score": sum(r["score"] for r in recs) / len(recs)}
    if kind == "ppl":
        return {"ppl": metrics.perplexity(sum(r["nll_sum"] for r in recs), sum(r["tokens"] for r in recs))}
    n = sum(r["tokens"] for r in recs)
    return {"top-1 %": 100.0 * sum(r["agree"].count("1") for r in recs) / n,
            "KL": sum(sum(r["kl"]) for r in recs) / n,
            "ppl (decoded)": metrics.perplexity(sum(r["nll_sum"] for r in recs), n)}


class Report:
    """Everything in a sample log, aggregated."""

    def __init__(self, records: list[dict]) -> None:
        self.records = records
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in records:
            groups[(r["task"], r["model"], r["label"], r["length"])].append(r)
        order = {t: i for i, t in enumerate(TASKS)}
        models = list(dict.fromkeys(r["model"] for r in records))
        labels = list(dict.fromkeys(r["label"] for r in records))
        self.cells: list[Cell] = []
        for (task, model, label, length), recs in sorted(
                groups.items(), key=lambda kv: (order.get(kv[0][0], 99), models.index(kv[0][1]),
                                                labels.index(kv[0][2]), kv[0][3])):
            for metric, value in _aggregate(recs[0]["kind"], recs).items():
                self.cells.append(Cell(task, metric, model, label, length, value, len(recs)))
        self.lengths = sorted({c.length for c in self.cells})

    def rows(self) -> list[tuple[str, str, str, str]]:
        return list(dict.fromkeys((c.task, c.metric, c.model, c.config) for c in self.cells))

    def markdown(self) -> str:
        if not self.cells:
            return "no results\n"
        fmt = {m: f for spec in METRICS.values() for m, f in spec}
        by = {(c.task, c.metric, c.model, c.config, c.length): c for c in self.cells}
        lines = ["| task | metric | model | config | " + " | ".join(fmt_length(n) for n in self.lengths)
                 + " | samples |", "|---|---|---|---|" + "---:|" * len(self.lengths) + "---|"]
        for row in self.rows():
            cells = [by.get((*row, n)) for n in self.lengths]
            counts = sorted({c.samples for c in cells if c})
            n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
            lines.append("| " + " | ".join(row) + " | "
                         + " | ".join(fmt[row[1]].format(c.value) if c else "—" for c in cells) + f" | {n} |")
        return "\n".join(lines) + "\n"

    def buckets(self) -> list[dict]:
        """Agreement by absolute position (buckets that double: 0-512, 512-1K, 1K-2K, ...), per configuration."""
        out = []
        groups: dict[tuple, list[dict]] = defaultdict(list)
        for r in self.records:
            if r["kind"] == "agreement":
                groups[(r["model"], r["label"], r["reference"])].append(r)
        for (model, label, ref), recs in groups.items():
            pos, agree, kl = [], [], []
            for r in recs:
                pos += range(r["first_position"], r["first_position"] + r["tokens"])
                agree += [int(c) for c in r["agree"]]
                kl += r["kl"]
            edges = metrics.bucket_edges(max(pos))
            out.append({"model": model, "config": label, "reference": ref,
                        "buckets": [asdict(b) for b in metrics.bucketize(pos, agree, kl, edges)]})
        return out

    def to_json(self) -> str:
        return json.dumps({
            "cells": [asdict(c) for c in self.cells],
            "agreement_by_position": self.buckets(),
            "tasks": {t.name: {"kind": t.kind, "description": t.description, "metric": t.metric,
                               "tokens_to_generate": t.tokens_to_generate} for t in TASKS.values()},
            "corpora": {"kjv": corpora.KJV_LICENCE, "words": corpora.WORDS_LICENCE, "noise": corpora.NOISE},
            "samples": len(self.records),
        }, indent=1)

    def plot(self, path: str) -> str | None:
        """PNG: one panel per (task, metric), value against length, one line per model and configuration.
        Returns a reason instead when matplotlib is missing."""
        plt, why = pyplot()
        if plt is None:
            return why
        panels = list(dict.fromkeys((c.task, c.metric) for c in self.cells))
        if not panels:
            return "no results"
        ncols = min(4, len(panels))
        nrows = (len(panels) + ncols - 1) // ncols
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.3 * nrows), squeeze=False)
        for ax, (task, metric) in zip(axes.flat, panels):
            series = list(dict.fromkeys((c.model, c.config) for c in self.cells if (c.task, c.metric) == (task, metric)))
            for model, config in series:
                pts = sorted((c.length, c.value) for c in self.cells
                             if (c.task, c.metric, c.model, c.config) == (task, metric, model, config))
                ax.plot(*zip(*pts), marker="o", label=f"{model} · {config}")
            ax.set_xscale("log", base=2)
            ax.set_xticks(self.lengths, [fmt_length(n) for n in self.lengths])
            ax.set_title(task if metric in ("score", task) else f"{task}: {metric}", fontsize=10)
            if metric in ("score", "top-1 %"):
                ax.set_ylim(-3, 103)
            ax.grid(alpha=0.3)
        for ax in list(axes.flat)[len(panels):]:
            ax.axis("off")
        axes.flat[0].legend(fontsize=7)
        fig.supxlabel("length (model tokens)")
        fig.tight_layout()
        d = os.path.dirname(os.path.abspath(path))
        fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=".png")
        os.close(fd)
        try:
            fig.savefig(tmp, dpi=100)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        finally:
            plt.close(fig)
            if os.path.exists(tmp):
                os.unlink(tmp)
        return None
