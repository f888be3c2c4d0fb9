"""What decode micro-batches buy on the ray tier (Lamina's rotation, in its simplest form: while
one micro-batch waits on its attention round trip, the other computes its projections and MLP).

    python benchmarks/ray/pipeline.py --model smollm2-135m --batch 8 --context 1024 --gen 24

Starts a local Ray cluster (a head without CPUs, ``--shards`` worker nodes of one CPU each),
puts all the KV on the ray tier, and decodes the same batch with ``--decode-microbatches`` 1 and
2, alternating, ``--rounds`` times; prints decode tok/s per run and the medians, and the same
batch in memory for scale.
"""

from __future__ import annotations

import argparse
import json
import statistics

import numpy as np

from kvoffload import SamplingParams
from kvoffload.api import LLM


def run(model: str, prompts, gen: int, **kw) -> float:
    llm = LLM(model, **kw)
    try:
        llm.generate(prompts, SamplingParams(max_tokens=gen, ignore_eos=True))
        t = llm.engine.times
        return len(prompts) * t.decode_steps / t.decode_forward
    finally:
        llm.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--gen", type=int, default=24)
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
    out: dict = {"args": vars(a), "ray": {1: [], 2: []}}
    try:
        for _ in range(a.shards):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
        rng = np.random.default_rng(0)
        prompts = [rng.integers(100, 30000, a.context).tolist() for _ in range(a.batch)]
        common = dict(max_num_seqs=a.batch, prefill_chunk=512)
        out["memory"] = run(a.model, prompts, a.gen, **common)
        print(f"in memory: {out['memory']:.1f} tok/s", flush=True)
        for r in range(a.rounds):
            for mb in (1, 2):
                tok_s = run(a.model, prompts, a.gen, kv_tiers="ray:none", ray_shards=a.shards, kv_sink_tokens=0,
                            kv_recent_tokens=0, decode_microbatches=mb, **common)
                out["ray"][mb].append(tok_s)
                print(f"round {r}: ray tier, {mb} micro-batch(es): {tok_s:.1f} tok/s", flush=True)
    finally:
        ray.shutdown()
        cluster.shutdown()
    med = {mb: statistics.median(v) for mb, v in out["ray"].items()}
    out["median"] = med
    print(f"median decode tok/s: 1 micro-batch {med[1]:.1f}, 2 micro-batches {med[2]:.1f} "
          f"({med[2] / med[1]:.2f}x); in memory {out['memory']:.1f}")
    if a.output:
        with open(a.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
