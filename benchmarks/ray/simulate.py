"""On paper, from measured costs: when remote attention on memory nodes (the ray tier) beats
reading the KV from a local disk, and how many memory nodes a batch needs (benchmarks/ray/README.md).

    python benchmarks/ray/simulate.py --measured benchmarks/ray/measure.json -o benchmarks/ray/simulate.md

A decode step of a Llama-shaped model at ``--context`` tokens, dense attention, batch B:

* local disk: every layer's KV is read from the disk: ``t_disk = B * kv_seq / disk_bw`` (reads
  overlap compute at best, so this is a lower bound on the step);
* remote: one round trip per layer (layer l+1 needs layer l's output), the bytes of every
  token crossing the driver's link, and the memory nodes reading their share of the KV from RAM:
  ``t_remote = L * (latency + overhead) + L * B * bytes_tl / bw + B * kv_seq / (nodes * mem_bw)``,
  where ``bytes_tl`` is the bytes per token and layer (Lamina's ``(2 + 2/G)·e·d``, or the ray
  tier's measured bytes: fp32 q to each shard, (o, lse) back, block lists) and ``overhead`` the
  measured per-round-trip cost of the software path (Ray's task submission and reply).

Remote attention wins when ``t_remote < t_disk``: the least link bandwidth for a given latency is
``L * B * bytes_tl / (t_disk - L * (latency + overhead) - t_attn)`` (none when the round trips
alone cost more than the disk). Memory nodes for a batch: enough RAM for ``B * kv_seq``, and
enough RAM bandwidth to read it within an attention-time budget per step.
"""

from __future__ import annotations

import argparse
import json
import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Shape:
    name: str
    layers: int
    heads: int
    kv_heads: int
    head_dim: int

    @property
    def d(self) -> int:
        return self.heads * self.head_dim

    @property
    def G(self) -> int:
        return self.heads // self.kv_heads

    def kv_token_layer(self, e: int) -> int:
        return 2 * self.kv_heads * self.head_dim * e


SHAPES = [Shape("Llama-3-8B", 32, 32, 8, 128), Shape("Llama-3-70B", 80, 64, 8, 128)]
GiB = 2 ** 30


def lamina_bytes(s: Shape, e: int) -> float:
    """Lamina's per token and layer: q, k, v in and o out, ``(2 + 2/G)·e·d``."""
    return (2 + 2 / s.G) * e * s.d


def ray_bytes(s: Shape, e: int, shards: int, context: int, chunk_tokens: int, merged: bool,
              fraction: float = 1.0) -> float:
    """The ray tier's per token and layer, as measure.py counts it: fp32 q to each shard; fp32
    (o, lse) back from each, per row merged on the actor (plus its 8-byte item index) or per
    chunk with --ray-exact; per chunk its row and first-block index and its block list (one slot
    when whole, 8 bytes per chosen block under a sparse policy); and the new token's k, v once
    (written in whole blocks)."""
    chunks = context // chunk_tokens
    q = 4 * s.d * shards
    back = (4 * (s.d + s.heads) + 8) * shards if merged else 4 * (s.d + s.heads) * chunks
    lists = 24 * chunks if fraction >= 1 else 16 * chunks + 8 * context * fraction / 16
    return q + back + lists + 8 * shards + s.kv_token_layer(e)


def min_bandwidth(s: Shape, B: int, context: int, e: int, bytes_tl: float, latency: float, overhead: float,
                  disk_bw: float, nodes: int, mem_bw: float, fraction: float = 1.0) -> float | None:
    """Least link bandwidth (bytes/s) at which remote attention beats the disk, or None."""
    kv_seq = s.layers * context * s.kv_token_layer(e) * fraction
    t_disk = B * kv_seq / disk_bw
    t_attn = B * kv_seq / (nodes * mem_bw)
    spare = t_disk - s.layers * (latency + overhead) - t_attn
    return None if spare <= 0 else s.layers * B * bytes_tl / spare


def max_latency(s: Shape, B: int, context: int, e: int, overhead: float, disk_bw: float, nodes: int,
                mem_bw: float, fraction: float = 1.0) -> float:
    """The round-trip latency at which remote attention ties the disk with an infinitely fast link."""
    kv_seq = s.layers * context * s.kv_token_layer(e) * fraction
    return (B * kv_seq / disk_bw - B * kv_seq / (nodes * mem_bw)) / s.layers - overhead


def fmt_bw(x: float | None) -> str:
    if x is None:
        return "never"
    return f"{x / 1e9:.2f} GB/s" if x >= 1e8 else f"{x / 1e6:.1f} MB/s"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--measured", help="measure.py's JSON (its median round-trip overhead is used)")
    ap.add_argument("--context", type=int, default=128 * 1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--kv-bytes", type=int, default=2, help="bytes per KV element (bf16: 2)")
    ap.add_argument("--disk-bw", default="2.0,7.0", help="local disk read GB/s to compare with")
    ap.add_argument("--mem-bw", type=float, default=100.0, help="a memory node's attention read rate, GB/s")
    ap.add_argument("--node-ram", type=float, default=512.0, help="KV a memory node holds, GiB")
    ap.add_argument("--shards", type=int, default=8, help="memory nodes (actors) the KV is spread over")
    ap.add_argument("--latencies-us", default="5,33,66.6,200,1000", help="link round-trip latencies, µs")
    ap.add_argument("--overhead-us", type=float, default=None, help="software overhead per round trip "
                    "(default: measure.py's median, else 0)")
    ap.add_argument("--read-fraction", type=float, default=1.0,
                    help="KV read per step (a sparse policy's budget, e.g. 0.0625): on the disk and on the memory nodes")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    f = a.read_fraction
    overhead, measured_note = 0.0, "no measurement given: software overhead 0"
    if a.overhead_us is not None:
        overhead, measured_note = a.overhead_us * 1e-6, f"software overhead {a.overhead_us:g} µs (given)"
    elif a.measured:
        rows = json.load(open(a.measured))
        small = sorted(r["one_block_attend_s"] for r in rows)
        overhead = small[len(small) // 2]
        measured_note = (f"software overhead per round trip {overhead * 1e6:.0f} µs: the median one-block attend "
                         f"through Ray measured by measure.py ({a.measured})")
    disks = [float(x) * 1e9 for x in a.disk_bw.split(",")]
    lats = [float(x) * 1e-6 for x in a.latencies_us.split(",")]
    e, T, B = a.kv_bytes, a.context, a.batch
    out = [f"Context {T} tokens, KV {8 * e}-bit, {f:g} of it read per step, {a.shards} memory nodes reading at {a.mem_bw:g} GB/s each; "
           f"{measured_note}.", ""]
    out.append("### Bytes per token and layer")
    out.append("")
    out.append("| model | G | Lamina (2+2/G)·e·d | ray tier, merged on actors | ray tier, --ray-exact |")
    out.append("|---|---|---|---|---|")
    for s in SHAPES:
        out.append(f"| {s.name} | {s.G} | {lamina_bytes(s, e) / 1024:.1f} KiB | "
                   f"{ray_bytes(s, e, a.shards, T, 256, True, f) / 1024:.1f} KiB | "
                   f"{ray_bytes(s, e, a.shards, T, 256, False, f) / 1024:.1f} KiB |")
    for B_ in sorted({1, B}):
        out += ["", f"### Least link bandwidth at which remote attention beats the local disk (batch {B_})", ""]
        head = "| model | bytes | disk | " + " | ".join(f"{x * 1e6:g} µs" for x in lats) + " | wins while the link's round trip is under |"
        out += [head, "|" + "---|" * (head.count("|") - 1)]
        for s in SHAPES:
            for label, btl in (("Lamina", lamina_bytes(s, e)), ("ray tier", ray_bytes(s, e, a.shards, T, 256, True, f))):
                for dbw in disks:
                    cells = [fmt_bw(min_bandwidth(s, B_, T, e, btl, lat, overhead, dbw, a.shards, a.mem_bw * 1e9, f))
                             for lat in lats]
                    ml = max_latency(s, B_, T, e, overhead, dbw, a.shards, a.mem_bw * 1e9, f)
                    out.append(f"| {s.name} | {label} | {dbw / 1e9:g} GB/s | " + " | ".join(cells)
                               + f" | {format(ml * 1e3, '.1f') + ' ms' if ml > 0 else 'never'} |")
    links = [("10 GbE, TCP", 1.25e9, 100e-6), ("100 Gb RoCE", 12.5e9, 33e-6), ("400 Gb RoCE (Lamina)", 50e9, 33e-6)]
    out += ["", f"### Time per decode step, batch {B} (the attention part only: KV reads or remote attention)", ""]
    out += ["| model | local disk 2 GB/s | local disk 7 GB/s | " + " | ".join(n for n, _, _ in links) + " |",
            "|---|---|---|" + "---|" * len(links)]
    for s in SHAPES:
        kv_seq = s.layers * T * s.kv_token_layer(e) * f
        btl = ray_bytes(s, e, a.shards, T, 256, True, f)
        remote = [s.layers * (lat + overhead) + s.layers * B * btl / bw + B * kv_seq / (a.shards * a.mem_bw * 1e9)
                  for _, bw, lat in links]
        out.append(f"| {s.name} | {B * kv_seq / 2e9:.1f} s | {B * kv_seq / 7e9:.1f} s | "
                   + " | ".join(f"{t * 1e3:.0f} ms" for t in remote) + " |")
    out += ["", f"### Memory nodes for batch {B} at {T} tokens", ""]
    out += ["| model | KV per sequence | KV of the batch | nodes by RAM "
            f"({a.node_ram:g} GiB each) | nodes to read a step's KV in 100 ms | in 500 ms |", "|---|---|---|---|---|---|"]
    for s in SHAPES:
        kv_seq = s.layers * T * s.kv_token_layer(e)
        total = B * kv_seq
        by_ram = math.ceil(total / (a.node_ram * GiB))
        by_bw = [math.ceil(total * f / (a.mem_bw * 1e9 * t)) for t in (0.1, 0.5)]
        out.append(f"| {s.name} | {kv_seq / GiB:.0f} GiB | {total / GiB:.0f} GiB | {by_ram} | {by_bw[0]} | {by_bw[1]} |")
    text = "\n".join(out) + "\n"
    print(text)
    if a.output:
        with open(a.output, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
