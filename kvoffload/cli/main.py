"""``kvoffload`` command: one module per subcommand."""

from __future__ import annotations

import argparse
import os
import sys

from kvoffload.errors import KvoffloadError


def build_parser() -> argparse.ArgumentParser:
    from kvoffload.cli import bench, calibrate, eval, generate, info, specbench, sweep

    parser = argparse.ArgumentParser(prog="kvoffload", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    for mod in (generate, info, bench, eval, calibrate, sweep, specbench):
        mod.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.run(args) or 0
    except KvoffloadError as e:
        print(f"kvoffload: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kvoffload: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # stdout closed early (e.g. `| head`): not an error of ours
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
