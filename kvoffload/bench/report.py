"""Benchmark results: medians, pairwise ratios, markdown / JSON / PNG."""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field

from kvoffload.bench.workloads import BenchTest, Sample
from kvoffload.plotting import pyplot


@dataclass
class Cell:
    """All repetitions of one (test, engine)."""

    test: BenchTest
    engine: str
    samples: list[float] = field(default_factory=list)    # tokens/s per repetition
    ttft: list[float] = field(default_factory=list)       # pp tests: seconds to the first token per repetition

    @property
    def median(self) -> float:
        return statistics.median(self.samples) if self.samples else float("nan")

    def fmt(self) -> str:
        if not self.samples:
            return "—"
        return f"{self.median:.1f} ({min(self.samples):.1f}–{max(self.samples):.1f})"


@dataclass
class Report:
    model: str
    threads: int
    reps: int
    engines: list[str]
    labels: dict[str, str]                                 # engine -> "batched" / "sequential"
    skipped: dict[str, str]                                # engine -> reason
    rss_mib: dict[str, float]                              # engine -> RSS added by loading it
    peak_rss_mib: float = 0.0
    load_s: dict[str, float] = field(default_factory=dict)   # engine -> seconds to load the model
    cells: dict[tuple[str, str], Cell] = field(default_factory=dict)   # (test name, engine)
    tests: list[BenchTest] = field(default_factory=list)
    prefill_once: bool = False          # decode tests: rounds on one prefill per engine (BenchConfig)

    def add(self, test: BenchTest, engine: str, sample: Sample) -> None:
        if test not in self.tests:
            self.tests.append(test)
        cell = self.cells.setdefault((test.name, engine), Cell(test, engine))
        cell.samples.append(sample.tok_s)
        if sample.ttft_s is not None:
            cell.ttft.append(sample.ttft_s)

    def ratios(self, test: BenchTest, a: str, b: str) -> list[float]:
        """a / b pair by pair (repetition i of a against repetition i of b: same moment, same noise)."""
        xa, xb = self.cells[(test.name, a)].samples, self.cells[(test.name, b)].samples
        return [x / y for x, y in zip(xa, xb) if y > 0]

    def markdown(self) -> str:
        how = f"{self.reps} interleaved repetitions after a warm-up"
        if self.prefill_once:
            how += (f" (decode tests: {self.reps} rounds of n tokens on one prefill per engine, engines alternating; "
                    "the context grows by n a round)")
        lines = [f"Model `{self.model}`, {self.threads} threads, median (min–max) tokens/s of {how}; peak RSS of "
                 f"the process {self.peak_rss_mib:.0f} MiB.", ""]
        lines.append("| test | " + " | ".join(f"{e} ({self.labels[e]})" for e in self.engines) + " |")
        lines.append("|---|" + "---|" * len(self.engines))
        for t in self.tests:
            lines.append(f"| {t.name} | " + " | ".join(self.cells[(t.name, e)].fmt() if (t.name, e) in self.cells
                                                      else "—" for e in self.engines) + " |")
        first, peers = self.engines[0], self.engines[1:]
        if peers:
            lines += ["", f"Ratios {first} / peer, pair by pair (median, min–max):", "",
                      "| test | " + " | ".join(peers) + " |", "|---|" + "---|" * len(peers)]
            for t in self.tests:
                row = []
                for p in peers:
                    r = self.ratios(t, first, p) if (t.name, p) in self.cells else []
                    row.append(f"{statistics.median(r):.2f} ({min(r):.2f}–{max(r):.2f})" if r else "—")
                lines.append(f"| {t.name} | " + " | ".join(row) + " |")
        timed = [t for t in self.tests if any(self.cells.get((t.name, e)) and self.cells[(t.name, e)].ttft
                                              for e in self.engines)]
        if timed:
            lines += ["", "Time to first token (pp tests: submission to first token, ms; median (min–max)):", "",
                      "| test | " + " | ".join(self.engines) + " |", "|---|" + "---|" * len(self.engines)]
            for t in timed:
                row = []
                for e in self.engines:
                    ms = [1e3 * s for s in self.cells[(t.name, e)].ttft] if (t.name, e) in self.cells else []
                    row.append(f"{statistics.median(ms):.1f} ({min(ms):.1f}–{max(ms):.1f})" if ms else "—")
                lines.append(f"| {t.name} | " + " | ".join(row) + " |")
        lines += ["", "| engine | load (s) | RSS added by loading (MiB; the first also carries the PyTorch runtime) |",
                  "|---|---|---|"]
        lines += [f"| {e} | {self.load_s.get(e, float('nan')):.2f} | {self.rss_mib.get(e, float('nan')):.0f} |"
                  for e in self.engines]
        for e, why in self.skipped.items():
            lines.append(f"\nskipped {e}: {why}")
        return "\n".join(lines) + "\n"

    def to_json(self) -> str:
        return json.dumps({
            "model": self.model, "threads": self.threads, "reps": self.reps, "engines": self.engines,
            "labels": self.labels, "skipped": self.skipped, "rss_mib": self.rss_mib, "peak_rss_mib": self.peak_rss_mib,
            "load_s": self.load_s, "prefill_once": self.prefill_once,
            "results": [{"test": asdict(c.test), "name": c.test.name, "engine": c.engine, "tok_s": c.samples,
                         "median": c.median, "ttft_s": c.ttft} for c in self.cells.values()],
        }, indent=1)

    def plot(self, path: str) -> str | None:
        """PNG of tokens/s against context length, one line per engine and test kind/batch.
        Returns a reason instead when matplotlib is missing."""
        plt, why = pyplot()
        if plt is None:
            return why
        kinds = sorted({(t.kind, t.batch) for t in self.tests})
        fig, axes = plt.subplots(1, len(kinds), figsize=(5.5 * len(kinds), 4), squeeze=False)
        for ax, (kind, batch) in zip(axes[0], kinds):
            tests = sorted((t for t in self.tests if (t.kind, t.batch) == (kind, batch)), key=lambda t: t.context)
            for e in self.engines:
                pts = [(t.context, self.cells[(t.name, e)].median) for t in tests if (t.name, e) in self.cells]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=e)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("context length (tokens)")
            ax.set_ylabel("tokens/s")
            ax.set_title(("prefill" if kind == "pp" else "decode") + (f", batch {batch}" if batch > 1 else ""))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return None
