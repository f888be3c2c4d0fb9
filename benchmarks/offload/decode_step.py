"""Decode step time of one engine setting in a fresh process (the dense-on-disk rows of
benchmarks/disk/README.md, nineteenth session): python benchmarks/offload/decode_step.py B T JSON.
B sequences of T random tokens, one prefill chunk each, 32 tokens decoded; JSON: engine fields
(default host budget 32MiB). Prints ms a step and what the tiers read a step."""
import json
import sys

import numpy as np

from kvoffload import SamplingParams
from kvoffload.api import LLM

B, T = int(sys.argv[1]), int(sys.argv[2])
kw = json.loads(sys.argv[3]) if len(sys.argv) > 3 else {}
kw.setdefault("kv_host_budget", "32MiB")
llm = LLM(None, threads=2, max_num_seqs=B, prefill_chunk=T, **kw)
rng = np.random.default_rng(0)
prompts = [rng.integers(100, 30000, T).tolist() for _ in range(B)]
eng = llm.engine
llm.generate(prompts, SamplingParams(max_tokens=33, ignore_eos=True))
t = eng.times
s = eng.kv.stats()
rd = s.read_by_medium()
step = t.decode_forward / t.decode_steps
print(f"{sys.argv[3]}: {1e3*step:.1f} ms/step, disk {rd.get('disk',0)/t.decode_steps/2**20:.1f} MiB/step "
      f"({rd.get('disk',0)/t.decode_steps/step/1e9:.2f} GB/s), mem {rd.get('memory',0)/t.decode_steps/2**20:.1f} MiB/step, prefill {t.prefill_forward:.1f}s", flush=True)
llm.close()
