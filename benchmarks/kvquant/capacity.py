"""The context a fixed KV budget holds per KV dtype (SmolLM2-135M and Qwen2.5-Coder-0.5B
geometry, 16- and 64-token blocks): whole chunks in RAM (slot bytes) and on disk (page-aligned slots).
Prints a markdown table; no timing (the layout's arithmetic, kvoffload/kv/layout.py)."""

from __future__ import annotations

from kvoffload.kv.layout import BlockLayout

BUDGET = 1 << 30                                           # 1 GiB
MODELS = {"smollm2-135m": (30, 3, 64), "qwen2.5-coder-0.5b": (24, 2, 64)}   # layers, KV heads, head dim


def main() -> None:
    print(f"Tokens of context a {BUDGET >> 30} GiB KV budget holds (one sequence)\n")
    print("| model | block size | KV dtype | slot bytes (RAM) | slot bytes (disk) | tokens in RAM | tokens on disk "
          "| vs bf16 (RAM / disk) |")
    print("|---|---:|---|---:|---:|---:|---:|---|")
    for model, (layers, H, D) in MODELS.items():
        for bs in (16, 64):
            base = None
            for dt in ("bfloat16", "int8", "int4"):
                lay = BlockLayout(bs, H, D, dt)
                ram = BUDGET // (lay.slot_bytes * layers) * bs
                disk = BUDGET // (lay.disk_stride * layers) * bs
                base = base or (ram, disk)
                print(f"| {model} | {bs} | {dt} | {lay.slot_bytes} | {lay.disk_stride} | {ram} | {disk} "
                      f"| {ram / base[0]:.2f}x / {disk / base[1]:.2f}x |")


if __name__ == "__main__":
    main()
