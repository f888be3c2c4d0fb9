"""The KV placement matrix every exactness test runs over, built from the tier registry: each
registered tier alone, all of them at once (small budgets so that chunks spill through every
tier), several disk workers, and the disk read in-process (no workers); the ray tier when Ray is
installed (its actors on a local two-node cluster: tests/ray_cluster.py). Block size 4 and 2-block
chunks, so a tiny prompt spans many chunks (an fp32 slot of the tiny models is 1 KiB, on disk
too: kv/layout.py DIRECT_ALIGN)."""

from __future__ import annotations

import torch
from ray_cluster import available as ray_available

from kvoffload.kv.tiers.registry import TIERS
from kvoffload.model.interface import ForwardBatch, Logits, Phase

GEOMETRY = dict(block_size=4, chunk_blocks=2)
# the ray tier's actors merge partials in chunk order here (bit-identical; its default merges a
# row's chunks on the actor, tested within fp32 tolerance in tests/kv/test_ray_tier.py)
RAY = dict(ray_exact=True, ray_timeout=60.0)


def placements() -> dict[str, dict]:
    # the ray tier needs Ray (tests of a placement with it get the session's local cluster: conftest.py)
    names = [n for n in TIERS if n != "ray" or ray_available()]
    out = {f"all-{n}": dict(kv_tiers=f"{n}:none", disk_workers=1) for n in names}
    # 16 KiB a tier (4 KiB of disk: two chunks of a layer), the last one unbounded: chunks reach every tier
    budget = {"disk": "4KiB"}
    out["mixed"] = dict(kv_tiers=",".join(f"{n}:{'none' if i == len(names) - 1 else budget.get(n, '16KiB')}"
                                          for i, n in enumerate(names)),
                        kv_sink_tokens=4, kv_recent_tokens=8)
    out["disk-3-workers"] = dict(kv_tiers="host:2KiB,disk:none", disk_workers=3, kv_recent_tokens=0, kv_sink_tokens=0)
    out["disk-in-process"] = dict(kv_tiers="host:2KiB,disk:none", disk_workers=0, kv_recent_tokens=0, kv_sink_tokens=0)
    return {k: {**GEOMETRY, **(RAY if "ray" in v["kv_tiers"] else {}), **v} for k, v in out.items()}


PLACEMENTS = placements()


def uses_ray(name) -> bool:
    """Whether the placement called ``name`` puts KV on the ray tier."""
    tiers = str(PLACEMENTS.get(name, {}).get("kv_tiers", "")) if isinstance(name, str) else ""
    return any(t.split(":")[0] == "ray" for t in tiers.split(","))


def forced_logits(engine, ids: list[int], prompt_len: int) -> torch.Tensor:
    """Prefill ids[:prompt_len] in chunks, then decode the rest one token per step: ``[T, V]``."""
    rows = []
    sid = 10_000
    kv = engine.kv
    kv.allocate(sid, len(ids))
    with torch.inference_mode():
        chunk = engine.config.prefill_chunk
        for s in range(0, prompt_len, chunk):
            e = min(s + chunk, prompt_len)
            batch = ForwardBatch(Phase.PREFILL, (sid,), torch.arange(s, e)[None], (s,), Logits.ALL)
            rows.append(engine.model(torch.tensor([ids[s:e]]), batch, kv)[0])
        for p in range(prompt_len, len(ids)):
            batch = ForwardBatch(Phase.DECODE, (sid,), torch.tensor([[p]]), (p,))
            rows.append(engine.model(torch.tensor([[ids[p]]]), batch, kv))
    kv.free(sid)
    return torch.cat(rows).float()


def step_all(engine, requests, watch=None) -> tuple[list, list[torch.Tensor]]:
    """Run ``requests`` ((prompt ids, SamplingParams) pairs) to the end one engine step at a
    time (``watch(engine)`` after each): the finished sequences and the logits each sampled from
    (``[steps, V]``), in request order."""
    ids = [engine.add_request(p, params) for p, params in requests]
    logits: dict[int, list[torch.Tensor]] = {i: [] for i in ids}
    while engine.has_unfinished():
        plan, _ = engine.scheduler.schedule()
        ex = engine.execute(plan)
        for sid, row in ex.logits.items():
            logits[sid].append(row.float().clone())
        engine.update(plan, ex)
        if watch is not None:
            watch(engine)
    return [engine.pop_finished(i) for i in ids], [torch.stack(logits[i]) for i in ids]
