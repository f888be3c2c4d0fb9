"""``kvoffload bench offload``: an end-to-end job whose KV is many times the host budget.

The same batch of long prompts is generated twice, each in a fresh process (so peak RSS is the
job's own): once with the KV spilled to disk (``--kv-host-budget``), once with all KV in memory.
Variants of the offloaded run show what each overlap buys: workers one after another
(``--kv-serial``), no read-ahead (``--disk-read-ahead 0``), two decode micro-batches.
Reported per decode step: time, KV bytes read from each tier, and the physical bound
``disk bytes / disk bandwidth + memory bytes / memory bandwidth + compute``, where the
bandwidths are measured here (aligned O_DIRECT reads; a streaming memory read) and compute is
the in-memory run's step time less the ideal time to read its KV from memory.
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass

MiB = 2**20


@dataclass(frozen=True)
class OffloadBenchConfig:
    """model: GGUF / alias (None = default). batch, context, gen: sequences, prompt tokens each,
    tokens generated each. host_budget: the offloaded run's ``--kv-host-budget``. threads,
    disk_workers, offload_dir: as for generation. peak_bytes: size used to measure the peaks.
    variants: also run the offloaded job without each overlap (serial workers, no read-ahead)
    and with two decode micro-batches."""

    model: str | None = None
    batch: int = 4
    context: int = 4096
    gen: int = 32
    host_budget: str = "32MiB"
    threads: int = 2
    disk_workers: int = 2
    offload_dir: str | None = None
    peak_bytes: int = 1 << 30
    variants: bool = True


def _one(cfg: OffloadBenchConfig, offloaded: bool, extra: dict) -> dict:
    """Runs inside the child process: generate, report timings, bytes and peak RSS."""
    import numpy as np

    from kvoffload import SamplingParams
    from kvoffload.api import LLM

    kv = dict(kv_host_budget=cfg.host_budget, disk_workers=cfg.disk_workers, offload_dir=cfg.offload_dir,
              **extra) if offloaded else {}
    # one prefill chunk per prompt (both runs): a later chunk would attend its prefix on the disk
    # workers, whose numpy GEMM path is slow (measured separately, see benchmarks/offload/README.md)
    llm = LLM(cfg.model, threads=cfg.threads, max_num_seqs=cfg.batch, prefill_chunk=cfg.context, **kv)
    rng = np.random.default_rng(0)
    vocab = llm.model_config.vocab_size
    prompts = [rng.integers(100, min(vocab, 30000), cfg.context).tolist() for _ in range(cfg.batch)]
    params = SamplingParams(max_tokens=cfg.gen, ignore_eos=True)
    llm.generate(prompts, params)
    t = llm.engine.times
    out = {"decode_step_s": t.decode_forward / max(1, t.decode_steps), "decode_steps": t.decode_steps,
           "prefill_s": t.prefill_forward,
           "tok_s": cfg.batch * t.decode_steps / t.decode_forward if t.decode_forward else 0.0,
           # as stored: the KV dtype's bytes (fp32 unless --kv-dtype says otherwise), scales included
           "kv_bytes_per_token": llm.engine.kv.layout.token_bytes(1) * llm.model_config.num_layers}
    stats = llm.engine.kv.stats()
    if stats.tiers:
        steps = max(1, t.decode_steps)
        out["read_per_step"] = {k: v / steps for k, v in stats.read_by_medium().items()}
        out["held"] = stats.held
        out["budget"] = llm.config.kv.kv_host_budget
    out["weights_bytes"] = llm.load_stats.weight_bytes
    # peak RSS since exec (VmHWM): ru_maxrss of children would count the parent's pages at fork
    out["worker_rss_peak"] = sum(_vm_hwm(pid) for pid in stats.pids)
    llm.close()
    out["rss_peak"] = _vm_hwm(os.getpid())
    return out


def _vm_hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == os.getpid() else 0


def _child(cfg: OffloadBenchConfig, offloaded: bool, **extra) -> dict:
    cmd = [sys.executable, "-m", "kvoffload.bench.offload", json.dumps(asdict(cfg)), "1" if offloaded else "0",
           json.dumps(extra)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        from kvoffload.errors import KvoffloadError

        raise KvoffloadError("offload benchmark run failed: " + (r.stderr.strip().splitlines() or ["?"])[-1])
    return json.loads(r.stdout.strip().splitlines()[-1])


def run(cfg: OffloadBenchConfig, progress=print) -> dict:
    from kvoffload.bench.attention import disk_peak, memory_peak

    base = cfg.offload_dir or tempfile.gettempdir()
    progress("measuring memory and disk read bandwidth")
    mem_bw = memory_peak(cfg.threads, cfg.peak_bytes, 3) * 1e9
    d = tempfile.mkdtemp(prefix="kvoffload-bench-", dir=base)
    try:
        disk_bw = disk_peak(d, cfg.peak_bytes, 2) * 1e9
    finally:
        os.rmdir(d)
    progress(f"offloaded run: {cfg.batch} x {cfg.context} tokens, host budget {cfg.host_budget}")
    off = _child(cfg, True)
    variants = {}
    if cfg.variants:
        progress("offloaded run, workers one after another (what the overlap buys)")
        variants["serial"] = _child(cfg, True, kv_serial=True)
        progress("offloaded run, no read-ahead")
        variants["no_read_ahead"] = _child(cfg, True, disk_read_ahead=0)
        progress("offloaded run, 2 decode micro-batches (one computes while the other waits on the disks)")
        variants["microbatches"] = _child(cfg, True, decode_microbatches=2)
    progress("in-memory run")
    mem = _child(cfg, False)
    kv_total = off["kv_bytes_per_token"] * cfg.batch * (cfg.context + cfg.gen)
    mem_kv_step = mem["kv_bytes_per_token"] * cfg.batch * (cfg.context + cfg.gen // 2)
    compute = max(0.0, mem["decode_step_s"] - mem_kv_step / mem_bw)
    r = off["read_per_step"]
    bound = r.get("disk", 0.0) / disk_bw + r.get("memory", 0.0) / mem_bw + compute
    return {"config": asdict(cfg), "mem_bw": mem_bw, "disk_bw": disk_bw, "kv_total": kv_total,
            "offloaded": off, **variants, "in_memory": mem, "compute_s": compute, "bound_s": bound,
            "achieved_s": off["decode_step_s"], "ratio_to_bound": off["decode_step_s"] / bound}


def markdown(res: dict) -> str:
    cfg, off, mem = res["config"], res["offloaded"], res["in_memory"]
    r = off["read_per_step"]
    budget = off["budget"] or 0
    return "\n".join([
        f"{cfg['batch']} sequences x {cfg['context']} prompt tokens + {cfg['gen']} generated; "
        f"KV {res['kv_total'] / MiB:.0f} MiB = {res['kv_total'] / max(1, budget):.1f}x the host budget "
        f"({budget / MiB:.0f} MiB); measured peaks: memory {res['mem_bw'] / 1e9:.1f} GB/s, "
        f"disk (O_DIRECT) {res['disk_bw'] / 1e9:.2f} GB/s",
        "",
        "| run | decode tok/s | step time | KV read per step (memory / disk) | peak RSS (main + disk workers) |",
        "|---|---|---|---|---|",
        f"| offloaded | {off['tok_s']:.2f} | {off['decode_step_s'] * 1e3:.1f} ms | "
        f"{r.get('memory', 0) / MiB:.1f} / {r.get('disk', 0) / MiB:.1f} MiB | "
        f"{off['rss_peak'] / MiB:.0f} + {off['worker_rss_peak'] / MiB:.0f} MiB |",
        *[f"| offloaded, {name} | {res[key]['tok_s']:.2f} | {res[key]['decode_step_s'] * 1e3:.1f} ms | same | "
          f"{res[key]['rss_peak'] / MiB:.0f} + {res[key]['worker_rss_peak'] / MiB:.0f} MiB |"
          for key, name in (("serial", "workers one after another"), ("no_read_ahead", "no read-ahead"),
                            ("microbatches", "2 decode micro-batches")) if key in res],
        f"| in memory | {mem['tok_s']:.2f} | {mem['decode_step_s'] * 1e3:.1f} ms | all in RAM | "
        f"{mem['rss_peak'] / MiB:.0f} MiB |",
        "",
        f"Bound per offloaded step: disk {r.get('disk', 0) / res['disk_bw'] * 1e3:.1f} ms + memory "
        f"{r.get('memory', 0) / res['mem_bw'] * 1e3:.1f} ms + compute {res['compute_s'] * 1e3:.1f} ms "
        f"= {res['bound_s'] * 1e3:.1f} ms; achieved {res['achieved_s'] * 1e3:.1f} ms "
        f"= {res['ratio_to_bound']:.2f}x the bound (target <= 1.25).",
        "",
        f"Memory of the offloaded run: peak RSS {off['rss_peak'] / MiB:.0f} MiB = weights "
        f"{off['weights_bytes'] / MiB:.0f} MiB + host KV budget {budget / MiB:.0f} MiB + tails "
        f"{off['held']['tails'] / MiB:.1f} MiB + {(off['rss_peak'] - off['weights_bytes'] - budget - off['held']['tails']) / MiB:.0f} MiB "
        f"other (runtime, activations, prefill chunk); disk workers {off['worker_rss_peak'] / MiB:.0f} MiB in all. "
        f"The in-memory run holds the whole KV: {mem['rss_peak'] / MiB:.0f} MiB.",
    ])


if __name__ == "__main__":
    conf = OffloadBenchConfig(**json.loads(sys.argv[1]))
    print(json.dumps(_one(conf, sys.argv[2] == "1", json.loads(sys.argv[3]))))
