"""kvoffload runs a language model (GGUF or Hugging Face Llama/Mistral/Qwen2) on this machine
when its KV cache does not fit in fast memory: the cache is spread over device memory, host RAM
and disk, where worker processes compute attention beside the data; sparse attention and
self-speculative decoding read less of it.

Start with:
  kvoffload generate -p "Why is the sky blue?" --chat          # the embedded SmolLM2-135M
  kvoffload generate -f long.txt --kv-host-budget 256MiB        # KV past 256 MiB goes to disk
  kvoffload info qwen2.5-coder-0.5b                             # a model's KV bytes per token
  kvoffload serve --port 8000                                   # an OpenAI-compatible server
  kvoffload batch jobs.jsonl -o results.jsonl --kv-store kv/    # an offline job; prefixes kept in kv/

Errors a user can cause are one line (`kvoffload: error: ...`, exit code 2).
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys

from kvoffload.errors import KvoffloadError


class _Parser(argparse.ArgumentParser):
    """argparse, with its usage errors on one line (``kvoffload: error: ...``, exit code 2)."""

    def error(self, message: str):
        self.exit(2, f"kvoffload: error: {message} (see `{self.prog} --help`)\n")


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so the offload files are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _on_signal(signum: int, frame) -> None:
    for s in (signal.SIGTERM, signal.SIGHUP):       # the first one wins; cleanup is not interrupted
        signal.signal(s, signal.SIG_IGN)
    raise Terminated(signum)


def build_parser() -> argparse.ArgumentParser:
    from kvoffload import __version__
    from kvoffload.cli import (
        batch,
        bench,
        calibrate,
        eval,
        generate,
        info,
        serve,
        specbench,
        store,
        sweep,
    )

    parser = _Parser(prog="kvoffload", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"kvoffload {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (generate, serve, batch, info, bench, eval, calibrate, sweep, specbench, store):
        mod.register(sub)
    return parser


_NEGATIVE = re.compile(r"^-\.?\d")


def _join_negative_values(argv: list[str]) -> list[str]:
    """``--flag -5MiB`` -> ``--flag=-5MiB``: argparse takes a value that starts with '-' (and is
    not a plain number) for a flag, and would fail with its whole usage instead of letting the
    flag's parser say what is wrong with the value."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a.startswith("--") and "=" not in a and i + 1 < len(argv) and _NEGATIVE.match(argv[i + 1]):
            out.append(f"{a}={argv[i + 1]}")
            i += 2
            continue
        out.append(a)
        i += 1
    return out


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_join_negative_values(list(sys.argv[1:] if argv is None else argv)))
    if argv is None:             # the command line: SIGTERM / SIGHUP clean up like Ctrl-C
        for s in (signal.SIGTERM, signal.SIGHUP):
            signal.signal(s, _on_signal)
    try:
        return args.run(args) or 0
    except KvoffloadError as e:
        print(f"kvoffload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvoffload: interrupted", file=sys.stderr)
        return 130
    except Terminated as t:
        print(f"kvoffload: stopped by {signal.Signals(t.signum).name}", file=sys.stderr)
        return 128 + t.signum
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
