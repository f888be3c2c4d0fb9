"""Two checkouts of kvoffload side by side: the same ``kvoffload bench`` run on each, alternating
(base, new, new, base, ...) for ``--rounds`` rounds, so a noisy machine moves both alike. Prints
per test and engine the median tok/s of each and the median of the per-round ratios new / base.

    python scripts/ab_bench.py --base ../base --rounds 5 -o ab -- -p 512 -n 32 -d 512,8159 -r 1 \\
        --config host:kv_host_budget=1GiB

Each checkout runs from its own source tree (``PYTHONPATH``); its native kernels compile into
its own cache entry (the cache key is the source).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile


def one(tree: str, bench_args: list[str]) -> dict[tuple[str, str], float]:
    with tempfile.TemporaryDirectory() as d:
        out = os.path.join(d, "r")
        env = {**os.environ, "PYTHONPATH": os.path.abspath(tree)}
        r = subprocess.run([sys.executable, "-m", "kvoffload.cli.main", "bench", *bench_args, "-o", out],
                           env=env, capture_output=True, text=True, cwd=d)
        if r.returncode != 0:
            sys.exit(f"bench in {tree} failed: {r.stderr.strip().splitlines()[-1:]}")
        res = json.load(open(out + ".json"))
    return {(x["name"], x["engine"]): x["median"] for x in res["results"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base", required=True, help="the other checkout (its repository root)")
    ap.add_argument("--new", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                    help="this checkout (default: the one holding this script)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("-o", "--output", help="write OUTPUT.md and OUTPUT.json")
    ap.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments of `kvoffload bench`")
    a = ap.parse_args()
    args = [x for x in a.bench_args if x != "--"]
    runs: dict[str, list[dict]] = {"base": [], "new": []}
    for i in range(a.rounds):
        order = ("base", "new") if i % 2 == 0 else ("new", "base")
        for which in order:
            print(f"round {i + 1}/{a.rounds}: {which}", file=sys.stderr, flush=True)
            runs[which].append(one(a.base if which == "base" else a.new, args))
    keys = sorted(runs["base"][0], key=lambda k: (k[1], k[0]))
    rows = ["| test | engine | base tok/s | new tok/s | new / base (median of rounds, min-max) |", "|---|---|---|---|---|"]
    table = []
    for k in keys:
        b = [r[k] for r in runs["base"]]
        n = [r[k] for r in runs["new"]]
        ratios = [y / x for x, y in zip(b, n)]
        table.append({"test": k[0], "engine": k[1], "base": b, "new": n, "ratios": ratios})
        rows.append(f"| {k[0]} | {k[1]} | {statistics.median(b):.1f} | {statistics.median(n):.1f} | "
                    f"{statistics.median(ratios):.3f} ({min(ratios):.3f}-{max(ratios):.3f}) |")
    text = f"`kvoffload bench {' '.join(args)}`, {a.rounds} rounds, alternating\n\n" + "\n".join(rows)
    print(text)
    if a.output:
        with open(a.output + ".md", "w") as f:
            f.write(text + "\n")
        with open(a.output + ".json", "w") as f:
            json.dump({"args": args, "rounds": a.rounds, "table": table}, f, indent=1)


if __name__ == "__main__":
    main()
