"""``kvoffload serve``: an OpenAI-compatible HTTP server (``/v1/completions``,
``/v1/chat/completions``, ``/v1/models``, ``/health``, ``/metrics``) over one engine; every
engine flag (KV tiers and budgets, sparse policy, speculation) applies to all requests."""

from __future__ import annotations

import argparse
import os
import sys

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig, ServeConfig
from kvoffload.errors import KvoffloadError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("serve", help="serve the model over an OpenAI-compatible HTTP API",
                       description=__doc__.split("\n\n")[0].replace("``", "'"))
    add_dataclass_args(p, ServeConfig)
    add_dataclass_args(p, EngineConfig)
    p.set_defaults(run=run)


def model_name(engine_cfg: EngineConfig, path: str) -> str:
    if engine_cfg.model is None:
        return "SmolLM2-135M-Instruct"
    name = os.path.basename(os.path.normpath(path))
    return name.removesuffix(".gguf")


def run(args: argparse.Namespace) -> int:
    engine_cfg = dataclass_from_args(EngineConfig, args)
    serve_cfg = dataclass_from_args(ServeConfig, args)
    try:
        import fastapi  # noqa: F401
        import prometheus_client  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as e:
        raise KvoffloadError(f"kvoffload serve needs the serve extra ({e.name} is missing): "
                             f"pip install 'kvoffload[serve]'") from None
    from kvoffload.api import LLM
    from kvoffload.model.generation import checkpoint_sampling_defaults
    from kvoffload.model.registry import resolve_model
    from kvoffload.preflight import preflight_chat_template
    from kvoffload.serve.app import create_app
    from kvoffload.serve.runner import bind, uvicorn_server

    path = resolve_model(engine_cfg.model, engine_cfg.cache_dir)
    preflight_chat_template(engine_cfg)
    sock = bind(serve_cfg.host, serve_cfg.port)          # a taken port fails before the slow load
    try:
        llm = LLM(config=engine_cfg)
        try:
            name = serve_cfg.served_model_name or model_name(engine_cfg, path)
            defaults = checkpoint_sampling_defaults(path)
            app = create_app(llm, serve_cfg, name, defaults)
            host, port = sock.getsockname()[:2]
            print(f"kvoffload: serving {name} at http://{host}:{port}/v1 (context {llm.engine._context} tokens, "
                  f"{engine_cfg.max_num_seqs} sequences per batch, {serve_cfg.max_queue} queued at most"
                  + (f"; sampling defaults from the checkpoint: {defaults}" if defaults else "") + ")",
                  file=sys.stderr, flush=True)
            uvicorn_server(app, serve_cfg.shutdown_timeout).run(sockets=[sock])
        finally:
            llm.close()                                   # the KV store's workers and offload files
    finally:
        sock.close()
    return 0
