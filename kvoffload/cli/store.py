"""``kvoffload store ls | du | verify | prune DIR``: look after a persistent KV store
(``--kv-store DIR``) without loading a model."""

from __future__ import annotations

import argparse
import os
import time

from kvoffload.config import parse_size


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("store", help="inspect, verify or prune a persistent KV store (--kv-store DIR)",
                       description="Inspect, verify or prune a persistent KV block store. Blocks are files "
                                   "named by their content key; several processes may use a store at once.")
    cmds = p.add_subparsers(dest="store_command", required=True)
    ls = cmds.add_parser("ls", help="blocks per model and KV layout (--blocks: every block)")
    ls.add_argument("dir", help="the store directory")
    ls.add_argument("--blocks", action="store_true", help="one line per block: key, parent, tokens, bytes, last use")
    du = cmds.add_parser("du", help="bytes and blocks the store holds")
    du.add_argument("dir", help="the store directory")
    ve = cmds.add_parser("verify", help="read every block and check its checksums (exit 1 if any is damaged)")
    ve.add_argument("dir", help="the store directory")
    ve.add_argument("--delete", action="store_true", help="delete the damaged blocks")
    pr = cmds.add_parser("prune", help="delete damaged and unreachable blocks, leftovers of killed writers, "
                                       "and the least recently used blocks past --max-bytes")
    pr.add_argument("dir", help="the store directory")
    pr.add_argument("--max-bytes", default=None, help="keep at most this much, e.g. 2GiB (0: empty the store)")
    for c in (ls, du, ve, pr):
        c.set_defaults(run=run)


def _open(path: str, write: bool):
    from kvoffload.kv.persist.store import BlockDir

    return BlockDir(path, create=write)


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def run(args: argparse.Namespace) -> int:
    return {"ls": _ls, "du": _du, "verify": _verify, "prune": _prune}[args.store_command](args)


def _ls(args: argparse.Namespace) -> int:
    d = _open(args.dir, write=False)
    groups: dict[str, list] = {}
    damaged = 0
    for key, h in d.headers():
        if h is None:
            damaged += 1
            continue
        groups.setdefault(h.namespace.hex(), []).append((key, h))
    notes = d.namespaces()
    for ns, blocks in groups.items():
        note = notes.get(ns, {})
        size = sum(d.index[k].bytes for k, _ in blocks if k in d.index)
        roots = sum(1 for _, h in blocks if h.parent == bytes(32))
        desc = (f"{note.get('source') or 'unknown model'} ({note.get('layers', '?')} layers, "
                f"{note.get('kv_heads', '?')}x{note.get('head_dim', '?')} {note.get('kv_dtype', '?')}, "
                f"block {note.get('block_size', '?')})")
        print(f"{ns[:12]}  {desc}: {len(blocks)} blocks, {roots} prompts' first blocks, {_mib(size)}")
        if args.blocks:
            for key, h in sorted(blocks, key=lambda kh: d.index[kh[0]].used_ns if kh[0] in d.index else 0):
                e = d.index.get(key)
                when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(e.used_ns / 1e9)) if e else "?"
                parent = "-" if h.parent == bytes(32) else h.parent.hex()[:12]
                print(f"  {key[:12]}  parent {parent:<12}  {len(h.tokens)} tokens  {e.bytes if e else 0} bytes  "
                      f"used {when}")
    if damaged:
        print(f"{damaged} damaged blocks (kvoffload store verify --delete, or prune)")
    if not groups and not damaged:
        print("empty")
    return 0


def _du(args: argparse.Namespace) -> int:
    d = _open(args.dir, write=False)
    tmp = os.path.join(d.path, "tmp")
    leftovers = os.listdir(tmp) if os.path.isdir(tmp) else []
    print(f"{d.path}: {len(d.index)} blocks, {_mib(d.bytes_held)} ({d.bytes_held} bytes)"
          + (f"; {len(leftovers)} temporary files" if leftovers else ""))
    return 0


def _verify(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    d = _open(args.dir, write=args.delete)
    bad = []
    for key, _ in tqdm(list(d.files()), desc="verifying", unit="block", disable=None):
        why = d.check(key)
        if why is not None:
            bad.append((key, why))
    for key, why in bad:
        print(f"{key[:12]}: {why}" + (" (deleted)" if args.delete else ""))
        if args.delete:
            d.remove(key)
    print(f"{len(d.index)} blocks checked, {len(bad)} damaged")
    return 1 if bad and not args.delete else 0


def _prune(args: argparse.Namespace) -> int:
    budget = parse_size(args.max_bytes) if args.max_bytes is not None else None
    d = _open(args.dir, write=True)        # (opening removes the temporary files of dead writers)
    with d.lock():
        bad = [k for k, _ in d.files() if d.check(k) is not None]
        for k in bad:
            d.remove(k)
        orphans: list[str] = []
        while True:                      # an orphan's children are orphans next
            more = d.orphans()
            if not more:
                break
            for k in more:
                d.remove(k)
            orphans += more
    evicted = d.enforce_budget(budget) if budget is not None else 0
    print(f"removed {len(bad)} damaged, {len(orphans)} unreachable, {evicted} least recently used blocks; "
          f"{len(d.index)} blocks, {_mib(d.bytes_held)} left")
    return 0
