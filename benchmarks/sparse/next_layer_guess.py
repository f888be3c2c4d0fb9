"""How well can a sparse layer's blocks be guessed before its own query exists?

The question behind reading the next layer's blocks from disk while this layer computes
(InfiniGen's idea; issue #20 item 4). It decodes a KJV passage in RAM and, before each sparse
layer l+1 attends, runs the policy's own ``predict_batch`` (layer l+1's metadata, nothing
appended) on three guesses of its query:

* ``q_l``: layer l's query, what ``--sparse-prefetch`` uses today;
* ``x_l``: layer l+1's q projection (its input norm, RoPE) of layer l's *input*, known when
  layer l starts;
* ``h_l``: the same of layer l's post-attention residual, known before layer l's MLP.

Per guess it reports three figures:
* the recall of layer l+1's true union;
* the recall of its *new* blocks, those not in the same layer's union at the previous step: what
  a block cache misses, and what a read-ahead has to find;
* the guess's size against the true union's.

A probe, not a test. It swaps the model's decoder-block forward for a plain-PyTorch copy that
records the hidden states, so it runs slower than ``kvoffload generate``::

    python benchmarks/sparse/next_layer_guess.py --context 8159 --steps 32
"""

from __future__ import annotations

import argparse
import collections

import torch

from kvoffload import SamplingParams
from kvoffload.api import LLM
from kvoffload.eval.corpora import kjv_verses
from kvoffload.model import fused, llama
from kvoffload.model.rope import apply_rope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("-m", "--model", default="smollm2-135m")
    p.add_argument("--policy", default="quest")
    p.add_argument("--budget", default="1/16")
    p.add_argument("--context", type=int, default=8159)
    p.add_argument("--steps", type=int, default=32)
    a = p.parse_args()

    llm = LLM(a.model, sparse_policy=a.policy, sparse_budget=a.budget)
    be, pol = llm.engine.kv, llm.engine.kv.policy
    seen: dict = {"x": {}, "h": {}, "q": {}, "rot": None, "on": False}

    def block_forward(block, x, batch, rot, backend):                     # llama.Block.forward, recording
        layer = block.attn.layer
        seen["x"][layer], seen["rot"] = x, rot
        h = x + block.attn(block.input_norm(x), batch, rot, backend)
        seen["h"][layer] = h
        return h + block.mlp(block.post_attn_norm(h))

    llama.Block.forward = block_forward
    fused.FusedBlock.forward = lambda self, x, batch, rot, backend: block_forward(self.block, x, batch, rot, backend)
    blocks = [getattr(b, "block", b) for b in llm.engine.model.layers]
    H, D = blocks[0].attn.heads, blocks[0].attn.head_dim

    def query_of(layer: int, x: torch.Tensor) -> torch.Tensor:
        """Layer ``layer``'s query ``[B, H, D]`` for hidden state x ``[B, 1, d]``."""
        qkv = blocks[layer].attn.qkv_proj(blocks[layer].input_norm(x)).view(x.shape[0], 1, -1, D)
        return apply_rope(qkv[:, :, :H], seen["rot"])[:, 0]

    prev: dict[int, set] = {}
    tally = collections.defaultdict(lambda: [0, 0, 0, 0, 0])              # true, hit, new, new hit, guessed
    decode = be.decode

    def probed(layer, q, k, v, batch):
        guesses = {}
        if seen["on"] and layer > 0 and pol.sparse(layer):
            with torch.no_grad():
                cand = {"x_l": query_of(layer, seen["x"][layer - 1]), "h_l": query_of(layer, seen["h"][layer - 1])}
            if layer - 1 in seen["q"]:
                cand["q_l"] = seen["q"][layer - 1]
            for name, g in cand.items():
                sel = pol.predict_batch(layer, batch.seq_ids, g.to(q.dtype), batch.starts)[0]
                guesses[name] = set(sel.union(be.bs)[0].tolist())
        seen["q"][layer] = q[:, :, 0]
        out = decode(layer, q, k, v, batch)
        if seen["on"] and pol.sparse(layer):
            true = set(be._step.union(0, 1)[0].tolist())
            new = true - prev.get(layer, set())
            for name, g in guesses.items():
                t = tally[name]
                t[0] += len(true)
                t[1] += len(true & g)
                t[2] += len(new)
                t[3] += len(new & g)
                t[4] += len(g)
            prev[layer] = true
        return out

    be.decode = probed
    ids = llm.encode(" ".join(kjv_verses()[:3000]))[:a.context]
    seen["on"] = True
    llm.generate([ids], SamplingParams(max_tokens=a.steps + 1, ignore_eos=True))
    print(f"{a.model}, {a.policy} {a.budget}, {len(ids)}-token context, {a.steps} steps")
    print("| guess | recall | recall of new blocks | new / true | guess size / true |")
    print("|---|---|---|---|---|")
    for name, (t, hit, n, nhit, size) in sorted(tally.items()):
        print(f"| {name} | {hit / t:.3f} | {nhit / max(n, 1):.3f} | {n / t:.2f} | {size / t:.2f} |")
    llm.close()


if __name__ == "__main__":
    main()
