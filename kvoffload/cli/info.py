"""``kvoffload info [MODEL]``: architecture and KV footprint, without loading the weights."""

from __future__ import annotations

import argparse
import json
import os

from kvoffload.config import EngineConfig


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a model's architecture and KV bytes per token")
    p.add_argument("model", nargs="?", default=None, help="GGUF file, HF directory or alias (default: embedded)")
    p.add_argument("--cache-dir", default=None, help=EngineConfig.__dataclass_fields__["cache_dir"].metadata["help"])
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from kvoffload.model.loading import model_summary, read_config
    from kvoffload.model.registry import resolve_model

    path = resolve_model(args.model, args.cache_dir)
    info = {"model": os.path.abspath(path), **model_summary(read_config(path))}
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        width = max(map(len, info))
        for k, v in info.items():
            print(f"{k:<{width}}  {v}")
    return 0
