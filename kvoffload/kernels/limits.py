"""Limits of the native paged attention kernel: their one home.

``build.py`` passes the kernel limits to gcc as ``-D`` defines (they are part of the build's
cache key; ``paged_attn.c`` has no values of its own), and ``paged.py`` checks its calls
against them. numpy-free and torch-free.
"""

from __future__ import annotations

G_MAX = 32          # query heads per KV head
D_MAX = 256         # head dimension
BS_MAX = 256        # tokens per block
H_MAX = 128         # query heads (H_kv * G)
MASK_BS_MAX = 64    # token masks are one uint64 per (block, KV head): bs <= 64 when masks are used

# Query rows per sequence up to which callers use the paged kernel (every row re-reads the
# sequence's blocks: right for decode and a verify pass's few rows); more rows (a prefill
# chunk) go to flash attention.
MAX_QUERY_ROWS = 32

# what build.py passes to the C compiler
C_DEFINES = {"G_MAX": G_MAX, "D_MAX": D_MAX, "BS_MAX": BS_MAX, "H_MAX": H_MAX, "MASK_BS_MAX": MASK_BS_MAX}
