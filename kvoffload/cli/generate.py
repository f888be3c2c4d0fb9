"""``kvoffload generate``: stream a completion to stdout, one timing line to stderr."""

from __future__ import annotations

import argparse
import json
import sys

from kvoffload.cli.args import add_dataclass_args, dataclass_from_args
from kvoffload.config import EngineConfig, SamplingParams
from kvoffload.errors import InputError

DEFAULT_MAX_TOKENS = 128


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a prompt (streams to stdout)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", "-p", help="the prompt text")
    src.add_argument("--prompt-file", "-f", help="read the prompt from this file ('-' = stdin)")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    p.add_argument("--json", action="store_true", help="print one JSON object (text, tokens, timings) instead of streaming")
    add_dataclass_args(p, EngineConfig)
    add_dataclass_args(p, SamplingParams)
    p.set_defaults(run=run)


def _read_prompt(args: argparse.Namespace) -> str:
    if args.prompt is not None:
        try:
            args.prompt.encode("utf-8")      # argv bytes that are not UTF-8 arrive as lone surrogates
        except UnicodeEncodeError as e:
            raise InputError(f"the prompt (-p) is not valid UTF-8 (at character {e.start})") from None
        return args.prompt
    name = "stdin" if args.prompt_file == "-" else f"prompt file {args.prompt_file}"
    try:
        if args.prompt_file == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(args.prompt_file, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        raise InputError(f"{name} is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise InputError(f"cannot read {name}: {e.strerror or e}") from None


def run(args: argparse.Namespace) -> int:
    engine_cfg = dataclass_from_args(EngineConfig, args)
    params = dataclass_from_args(SamplingParams, args)
    prompt = _read_prompt(args)
    if not prompt:
        raise InputError("the prompt is empty")

    from kvoffload.api import LLM
    from kvoffload.model.loading import peak_rss_bytes

    if args.chat:
        from kvoffload.preflight import preflight_chat_template

        preflight_chat_template(engine_cfg)            # before the slow load
    llm = LLM(config=engine_cfg)
    if args.json:
        out = llm.generate(prompt, params, chat=args.chat)[0]
    else:
        for delta in llm.stream(prompt, params, chat=args.chat):
            sys.stdout.write(delta)
            sys.stdout.flush()
        sys.stdout.write("\n")
        out = llm.last_output
    m = out.metrics
    if args.json:
        print(json.dumps({"text": out.text, "token_ids": out.token_ids, "prompt_tokens": m.prompt_tokens,
                          "finish_reason": out.finish_reason, "prefill_s": m.prefill_s, "decode_s": m.decode_s,
                          "prefill_tok_s": m.prefill_tok_s, "decode_tok_s": m.decode_tok_s, "ttft_s": m.ttft_s,
                          "reused_tokens": m.reused_tokens}))
    ls = llm.load_stats
    formats = f" [{ls.weight_formats}]" if ls.weight_formats else ""
    print(f"load {ls.seconds:.2f} s ({ls.weight_type} file; {ls.dtype}, quantization {ls.quantization}{formats}, "
          f"{ls.weight_bytes / 2**20:.0f} MiB weights, {llm.device}); "
          f"prompt {m.prompt_tokens} tok{f' ({m.reused_tokens} from the KV store)' if m.reused_tokens else ''}, prefill {m.prefill_s:.3f} s ({m.prefill_tok_s:.1f} tok/s); "
          f"generated {m.generated_tokens} tok, decode {m.decode_s:.3f} s ({m.decode_tok_s:.1f} tok/s); "
          f"finish: {out.finish_reason}; peak RSS {peak_rss_bytes() / 2**20:.0f} MiB", file=sys.stderr)
    report = llm.kv_report()
    if report:
        print(report, file=sys.stderr)
    return 0
