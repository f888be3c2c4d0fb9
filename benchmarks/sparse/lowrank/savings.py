"""What ShadowKV's low-rank keys (``shadowkv_lowrank``) save in RAM and in bytes read, and how
much of the keys' energy a rank keeps, measured on a model's real prefill keys (issue #20, 5).

    python benchmarks/sparse/lowrank/savings.py -m smollm2-135m -L 2048,8159 -n 16 -o benchmarks/sparse/lowrank/savings.json

Per length: one KJV prompt (the sweep's agreement text, sample 0) prefilled, ``-n`` tokens decoded
at budget 1/16 with the KV in RAM (the default KV dtype); then, from the policy's own counters:
the factors held against the exact keys they stand for (all layers), the bytes a sparse layer
step reads (K+V of every chosen block: what this implementation reads) against what ShadowKV's
layout would read (values alone for the blocks read only for rebuilt chunks), and the SVD time.
The energy table: per layer, the share of the pre-RoPE keys' squared Frobenius norm kept by the
best rank-r approximation (1 - sum of the dropped squared singular values / the total).
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main() -> None:
    from kvoffload import SamplingParams
    from kvoffload.api import LLM
    from kvoffload.config import SparseConfig
    from kvoffload.eval.tasks import text_tokens
    from kvoffload.sparse import make_policy

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-m", "--model", default="smollm2-135m")
    ap.add_argument("-L", "--lengths", default="2048,8159")
    ap.add_argument("-n", "--decode", type=int, default=16)
    ap.add_argument("--ranks", default="8,16,30,48,64,96")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    out = []
    for L in (int(x) for x in args.lengths.split(",")):
        llm = LLM(args.model, sparse_policy="shadowkv_lowrank", sparse_budget="1/16", threads=args.threads)
        ids = text_tokens(llm.tokenizer, L, 0, 0)
        eng = llm.engine
        sid = eng.add_request(ids, SamplingParams(max_tokens=args.decode + 8, ignore_eos=True))
        while len(eng.seqs[sid].output_ids) < args.decode:      # (measured while the sequence is held)
            eng.step()
        kv, pol = eng.kv, eng.kv.policy
        st, lr = kv.stats().sparse, pol.lowrank
        held, exact = pol.factor_bytes()
        bpt = st.bytes_per_token                            # K+V bytes of a token of one head
        read = st.read * bpt / st.steps                     # per sparse layer step, as read now
        v_only = lr.v_only * bpt / 2 / st.steps             # the keys of those ShadowKV would not read
        layers = sum(pol.sparse(i) for i in range(pol.model.num_layers))
        kv_total = L * bpt * pol.H_kv * pol.model.num_layers
        rec = {"model": args.model, "length": L, "kv_dtype": str(kv.kv_dtype).replace("torch.", ""),
               "rank": pol.rank, "channels": pol.H_kv * pol.D, "kv_bytes": kv_total,
               "factor_bytes": held, "exact_key_bytes": exact, "ram_saved_bytes": exact - held,
               "read_bytes_per_layer_step": round(read), "read_bytes_lowrank_layout": round(read - v_only),
               "read_fraction": st.read_fraction, "rebuilt_share": lr.rebuilt / max(1, st.attended),
               "factor_seconds": round(lr.factor_seconds, 3), "sparse_layers": layers}
        # energy kept per rank, from the same prefill keys (pre-RoPE, all heads of a layer together)
        ranks = [int(r) for r in args.ranks.split(",")]
        probe = make_policy(SparseConfig(sparse_policy="shadowkv_lowrank"), pol.model, pol.bs, torch.device("cpu"))
        seq = sid
        energy = []
        for layer in range(pol.model.num_layers):
            k, _ = kv.layout.unpack(kv.seqs[seq][layer, :-(-L // pol.bs)], L)          # [H_kv, L, D] post-RoPE
            cos, sin = probe._rope(torch.arange(L))
            pre = probe._rotate(k.float(), cos, -sin).transpose(0, 1).reshape(L, -1)
            s2 = torch.linalg.svdvals(pre.double()).square()
            energy.append([float(1 - s2[r:].sum() / s2.sum()) for r in ranks])
        e = np.array(energy)
        rec["energy_kept"] = {str(r): {"min": float(e[:, i].min()), "mean": float(e[:, i].mean())}
                              for i, r in enumerate(ranks)}
        out.append(rec)
        print(json.dumps(rec))
        eng.abort([sid])
        llm.close()
    if args.output:
        with open(args.output, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
