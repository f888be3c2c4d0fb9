"""Logit metrics: NLL, top-1 agreement and KL against hand computations; position buckets."""

from __future__ import annotations

import math

import pytest
import torch

from kvoffload.eval import metrics


def test_token_nll_is_cross_entropy():
    torch.manual_seed(0)
    logits, targets = torch.randn(700, 50), torch.randint(0, 50, (700,))      # more rows than one block
    nll = metrics.token_nll(logits.bfloat16(), targets)
    ref = torch.nn.functional.cross_entropy(logits.bfloat16().float(), targets, reduction="none")
    assert torch.allclose(nll, ref, atol=1e-5)
    assert metrics.perplexity(float(nll.double().sum()), 700) == pytest.approx(math.exp(float(nll.double().mean())))


def test_agreement_identical_and_shifted_logits():
    torch.manual_seed(1)
    a = torch.randn(600, 40)
    agree, kl = metrics.agreement(a, a.clone())
    assert agree.all() and kl.abs().max() == 0
    agree, kl = metrics.agreement(a + 3.0, a)                  # softmax ignores a constant shift
    assert agree.all() and kl.max() < 1e-5


def test_agreement_counts_mismatches_and_kl():
    p = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 2.0]])
    q = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, 2.5]])
    agree, kl = metrics.agreement(q, p)
    assert agree.tolist() == [False, True]
    lp, lq = torch.log_softmax(p, -1), torch.log_softmax(q, -1)
    assert torch.allclose(kl, (lp.exp() * (lp - lq)).sum(-1), atol=1e-6) and (kl > 0).all()


def test_buckets():
    assert metrics.bucket_edges(3000) == [0, 512, 1024, 2048, 4096]
    b = metrics.bucketize([100, 600, 700, 2500], [1, 1, 0, 1], [0.0, 0.1, 0.3, 0.2], [0, 512, 1024, 2048, 4096])
    assert [(x.lo, x.hi, x.tokens) for x in b] == [(0, 512, 1), (512, 1024, 2), (2048, 4096, 1)]
    assert b[1].top1 == 50.0 and abs(b[1].kl - 0.2) < 1e-12
