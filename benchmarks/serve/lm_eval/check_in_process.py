"""The same task scored in-process (LLM.engine.prompt_logits, no server): lm-eval through the
server must report the same acc and perplexity."""

import json
import math
import os

import torch

from kvoffload.api import LLM

HERE = os.path.dirname(os.path.abspath(__file__))
llm = LLM(dtype="float32", quantization="none")          # as run.sh serves it
nll, hits, n = 0.0, 0, 0
for line in open(os.path.join(HERE, "kjv_lastword.jsonl")):
    d = json.loads(line)
    ctx = llm.tokenizer.encode(d["context"], add_bos=False)
    cont = llm.tokenizer.encode(" " + d["target"], add_bos=False)
    ids = ctx + cont
    lp = torch.log_softmax(llm.engine.prompt_logits(ids).float(), -1)         # [T, V]
    rows = lp[len(ctx) - 1:len(ids) - 1]                                        # predict the continuation
    nll -= float(rows[torch.arange(len(cont)), torch.tensor(cont)].sum())
    hits += int(bool((rows.argmax(-1) == torch.tensor(cont)).all()))
    n += 1
print(json.dumps({"acc": hits / n, "perplexity": math.exp(nll / n), "n": n}))
