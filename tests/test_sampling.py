"""Sampling functions on crafted logits."""

from __future__ import annotations

import pytest
import torch

from kvoffload.config import SamplingParams
from kvoffload.errors import ConfigError
from kvoffload.sampling import make_generator, processed_probs, sample

LOGITS = torch.log(torch.tensor([0.5, 0.2, 0.15, 0.1, 0.05]))


def test_top_k_keeps_k_most_likely():
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_k=2))
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0, 0, 0]) / 0.7)


def test_top_p_keeps_smallest_set_reaching_p():
    # cumulative 0.5, 0.7, 0.85: p=0.8 needs the first three
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.8))
    assert torch.allclose(p, torch.tensor([0.5, 0.2, 0.15, 0, 0]) / 0.85)
    # the most likely token always stays
    p = processed_probs(LOGITS, SamplingParams(temperature=1.0, top_p=0.1))
    assert torch.allclose(p, torch.tensor([1.0, 0, 0, 0, 0]))


def test_temperature_sharpens():
    cold = processed_probs(LOGITS, SamplingParams(temperature=0.5))
    assert torch.allclose(cold, torch.softmax(LOGITS / 0.5, -1))
    assert cold[0] > 0.5


def test_greedy_is_argmax_per_row():
    logits = torch.stack([LOGITS, LOGITS.flip(0)])
    params = [SamplingParams(), SamplingParams()]
    assert sample(logits, params, [None, None]) == [0, 4]


def test_empirical_distribution_matches_probs():
    params = SamplingParams(temperature=1.0, seed=0)
    gen = make_generator(params, torch.device("cpu"))
    draws = [sample(LOGITS[None], [params], [gen])[0] for _ in range(4000)]
    freq = torch.bincount(torch.tensor(draws), minlength=5).float() / len(draws)
    assert (freq - LOGITS.exp()).abs().max() < 0.03


def test_penalties_match_their_definitions():
    from kvoffload.sampling import apply_penalties

    logits = torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0])
    p = SamplingParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, p, prompt_ids=[4], output_ids=[0, 0, 2])
    assert out.tolist() == pytest.approx([2.0 - 0.5 - 0.5, -1.0, 0.5 - 0.5 - 0.25, 3.0, 1.0])   # the prompt does not count
    r = SamplingParams(repeat_penalty=2.0, repeat_last_n=2)
    out = apply_penalties(logits, r, prompt_ids=[3, 1], output_ids=[0])                     # window: 1, 0
    assert out.tolist() == pytest.approx([1.0, -2.0, 0.5, 3.0, 1.0])
    assert apply_penalties(logits, SamplingParams(), [1], [1]).tolist() == logits.tolist()
    for bad in ({"presence_penalty": 3.0}, {"frequency_penalty": -2.5}, {"repeat_penalty": 0.0},
                {"repeat_last_n": -1}, {"logprobs": 21}):
        with pytest.raises(ConfigError):
            SamplingParams(**bad)
