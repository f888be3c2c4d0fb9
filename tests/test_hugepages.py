"""Huge-page host buffers (kvoffload/hugepages.py): same values, same sharing, aligned maps."""

from __future__ import annotations

import pytest
import torch

from kvoffload import hugepages

pytestmark = pytest.mark.skipif(not hugepages.supported(), reason="no mmap.madvise(MADV_HUGEPAGE) here")


def test_zeros_is_zero_and_aligned():
    t = hugepages.zeros((600, 1024), torch.float32)                   # 2.3 MiB
    assert t.shape == (600, 1024) and t.dtype == torch.float32 and not t.any()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    t[3, 5] = 1.5                                                     # writable
    assert t.sum() == 1.5
    small = hugepages.zeros((4, 4), torch.bfloat16)                   # below MIN_BYTES: ordinary
    assert not small.any() and small.dtype == torch.bfloat16


def test_moved_model_computes_the_same_and_keeps_ties():
    g = torch.Generator().manual_seed(0)
    emb = torch.nn.Embedding(1000, 512)
    head = torch.nn.Linear(512, 1000, bias=False)
    head.weight = emb.weight                                          # tied: one parameter, two owners
    mlp = torch.nn.Linear(512, 1024)
    model = torch.nn.ModuleDict({"emb": emb, "mlp": mlp, "head": head})
    model.register_buffer("big", torch.randn(300, 1024, generator=g))
    model.register_buffer("tiny", torch.randn(8, generator=g))
    for p in model.parameters():
        torch.nn.init.normal_(p, generator=g)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    old_ptrs = {k: v.data_ptr() for k, v in model.state_dict().items()}

    moved = hugepages.move_module_tensors(model, min_bytes=4096)
    expected = sum(v.nbytes for k, v in before.items() if v.nbytes >= 4096 and k != "head.weight")
    assert moved == expected
    after = model.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    assert model["head"].weight is model["emb"].weight                # still one tensor
    assert after["tiny"].data_ptr() == old_ptrs["tiny"]               # too small: left alone
    assert after["big"].data_ptr() != old_ptrs["big"]
    first = min(v.data_ptr() for k, v in after.items() if k != "tiny")
    assert first % hugepages.HUGE_PAGE == 0
    assert all(v.data_ptr() % hugepages.ALIGN == 0 for v in after.values())
    x = torch.randint(0, 1000, (3,))
    assert torch.equal(model["head"](model["emb"](x)), before["emb.weight"][x] @ before["emb.weight"].T)
