"""What one decode layer costs on the ray tier: the bytes that cross per token against Lamina's
(2 + 2/G)·e·d, and the time of a round trip to the actors (benchmarks/ray/README.md).

    python benchmarks/ray/measure.py -o benchmarks/ray/measure.json

Without ``--address`` it starts a local Ray cluster (a head without CPUs and one worker node per
shard: the actors run in other processes behind other raylets, but on this machine, so "the
network" is loopback). One layer of a Llama-shaped model (``--shape``: KV heads, head dim, G)
is written to the actors for ``--batch`` sequences of ``--context`` tokens; then decode
requests for that layer are timed (median of ``--reps``), and the same requests computed by the
actor's code in this process give the compute part, so ``remote - local`` is the round trip's
overhead. A tiny request (one block of one sequence) and an empty call (``where``) bound it.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import numpy as np
import torch

from kvoffload.config import KVConfig
from kvoffload.kv.layout import BlockLayout
from kvoffload.kv.tiers.protocol import AttendRequest, TierContext, TierSpec
from kvoffload.kv.tiers.ray import RayTier
from kvoffload.kv.tiers.ray_worker import ShardServer
from kvoffload.kv.tiers.shards import split_request

SHAPES = {   # name -> (query heads, KV heads, head dim): one layer's attention
    "8b": (32, 8, 128),      # Llama-3-8B
    "70b": (64, 8, 128),     # Llama-3-70B
}


def median_s(fn, reps: int) -> float:
    fn()                                                    # warm
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def build(tier: RayTier, lay: BlockLayout, batch: int, context: int, rng) -> list[np.ndarray]:
    """Each sequence's chunks written to the tier: per sequence its slots, in order."""
    per_seq = context // lay.chunk_tokens
    out = []
    for _ in range(batch):
        chunks = [tier.alloc() for _ in range(per_seq)]
        slots = (np.array(chunks, np.int64)[:, None] * lay.chunk_blocks + np.arange(lay.chunk_blocks)).reshape(-1)
        data = torch.from_numpy(rng.standard_normal((len(slots), lay.slot_elems), dtype=np.float32)).to(torch.bfloat16)
        tier.write(slots, data)
        out.append(slots)
    tier.sync()
    return out


def request(lay: BlockLayout, seq_slots: list[np.ndarray], H: int, rng) -> AttendRequest:
    B = len(seq_slots)
    counts = np.concatenate([np.full(len(s) // lay.chunk_blocks, lay.chunk_blocks) for s in seq_slots])
    first = np.zeros(len(counts) + 1, np.int64)
    np.cumsum(counts, out=first[1:])
    seq = np.concatenate([np.full(len(s) // lay.chunk_blocks, i) for i, s in enumerate(seq_slots)]).astype(np.int64)
    q = torch.from_numpy(rng.standard_normal((B, 1, H, lay.head_dim), dtype=np.float32))
    return AttendRequest(0, q, seq, first, np.concatenate(seq_slots))


def measure(tier: RayTier, lay: BlockLayout, H: int, G: int, batch: int, context: int, reps: int, rng) -> dict:
    c = tier.counters
    w0 = c.written
    seqs = build(tier, lay, batch, context, rng)
    written_per_token = (c.written - w0) / (batch * context)
    req = request(lay, seqs, H, rng)

    def remote():
        tier.submit(req)
        return tier.collect()

    before = (c.to_worker, c.from_worker)
    r = remote()
    sent, back = c.to_worker - before[0], c.from_worker - before[1]
    t_remote = median_s(remote, reps)
    # the same work by the actor's code here (its kernel, its merge): the compute part of t_remote
    servers = []
    for w, s in enumerate(tier.shards):
        srv = ShardServer(vars(lay), G, tier._args[2], "memory", lay.chunk_blocks * 64, {}, True)
        for sl in seqs:                                            # this shard's part of every sequence
            shard, local = tier._where(sl)
            pick = shard == w
            if pick.any():
                srv.write(local[pick], tier.read(sl[pick]).view(torch.uint8).numpy())
        servers.append(srv)
    subs = split_request(req, lay.chunk_blocks, len(tier.shards))

    def local():
        for w, _, sub in subs:
            rows = np.unique(sub.seq)
            servers[w].attend(AttendRequest(0, np.ascontiguousarray(sub.q[rows]), np.searchsorted(rows, sub.seq),
                                            sub.first, sub.slots), tier.merge)

    t_local = median_s(local, reps)
    for srv in servers:
        srv.close()
    e, d = 2, H * lay.head_dim
    q_bytes = req.q.numel() * 4
    return {
        "batch": batch, "context": context, "shards": len(tier.shards), "merge_on_actor": tier.merge,
        "lamina_bytes_per_token_layer": (2 + 2 / G) * e * d,
        "kv_written_per_token_layer": written_per_token,
        "to_actors_per_token_layer": sent / batch, "back_per_token_layer": back / batch,
        "q_fp32_per_token": q_bytes / batch, "block_lists_per_token_layer": (sent - q_bytes * len(subs)) / batch,
        "attend_remote_s": t_remote, "attend_local_s": t_local, "overhead_s": t_remote - t_local,
        "kv_read_per_request": r.bytes_read,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--address", help="an existing Ray cluster (default: start a local one)")
    ap.add_argument("--shards", type=int, default=2)
    ap.add_argument("--shape", choices=list(SHAPES), default="8b")
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    cluster = None
    if a.address is None:
        import ray
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False})
        for _ in range(a.shards):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes(timeout=60)
        ray.init(address=cluster.address, log_to_driver=False, logging_level="ERROR")
    H, H_kv, D = SHAPES[a.shape]
    G = H // H_kv
    lay = BlockLayout(16, H_kv, D, "bfloat16", 16)
    rng = np.random.default_rng(0)
    rows = []
    try:
        for exact in (False, True):
            kv = KVConfig(block_size=16, chunk_blocks=16, ray_address=a.address, ray_shards=a.shards,
                          ray_exact=exact, ray_timeout=120.0)
            tier = RayTier(TierSpec("ray", None), TierContext(lay, G, torch.device("cpu"), 1, kv))
            try:
                import ray

                ping = median_s(lambda: ray.get(tier.shards[0].actor.where.remote()), a.reps)
                tiny = request(lay, build(tier, lay, 1, lay.chunk_tokens, rng), H, rng)

                def one():
                    tier.submit(tiny)
                    tier.collect()

                small = median_s(one, a.reps)
                for b in (int(x) for x in a.batch.split(",")):
                    row = measure(tier, lay, H, G, b, a.context, a.reps, rng)
                    row.update(shape=a.shape, empty_call_s=ping, one_block_attend_s=small)
                    rows.append(row)
                    print(json.dumps(row), flush=True)
            finally:
                tier.close()
    finally:
        if cluster is not None:
            import ray

            ray.shutdown()
            cluster.shutdown()
    if a.output:
        with open(a.output, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    sys.exit(main())
