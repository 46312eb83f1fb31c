"""The distributions `sample` draws from, against hand-computed ones: many rows drawn at once with a
fixed seed, each frequency within 5 standard errors (plus a margin) of its expected probability;
the filters must keep exactly the tokens they should, no more and no fewer."""

import math

import pytest
import torch

from palm.inference.sampling import sample

DRAWS = 40_000


def frequencies(logits: torch.Tensor, seed: int = 0, **options) -> torch.Tensor:
    """Frequency of each id over DRAWS draws from the single row `logits` (vocab,)."""
    generator = torch.Generator().manual_seed(seed)
    drawn = sample(logits.expand(DRAWS, -1), generator=generator, **options)
    return torch.bincount(drawn, minlength=logits.shape[-1]).double() / DRAWS


def assert_distribution(observed: torch.Tensor, expected: torch.Tensor) -> None:
    """Each frequency within 5 standard errors of its probability (+0.002); zero where it is zero."""
    expected = expected.double()
    bound = 5 * (expected * (1 - expected) / DRAWS).sqrt() + 0.002
    assert ((observed - expected).abs() <= bound).all(), (observed, expected)
    assert (observed[expected == 0] == 0).all(), "a filtered-out token was drawn"


def renormalised(probs: list[float], keep: list[int]) -> torch.Tensor:
    kept = torch.zeros(len(probs), dtype=torch.float64)
    kept[keep] = torch.tensor([probs[i] for i in keep], dtype=torch.float64)
    return kept / kept.sum()


LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, -3.0])


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_temperature_scales_the_logits(temperature):
    # p_i proportional to exp(l_i / T), by hand
    weights = [math.exp(v / temperature) for v in LOGITS.tolist()]
    expected = torch.tensor(weights) / sum(weights)
    assert_distribution(frequencies(LOGITS, temperature=temperature, filter_thres=None), expected)


def test_top_k_renormalises_over_the_k_most_likely():
    probs = LOGITS.softmax(-1).tolist()
    assert_distribution(frequencies(LOGITS, temperature=1.0, top_k=2), renormalised(probs, [0, 1]))
    assert_distribution(frequencies(LOGITS, temperature=1.0, top_k=3), renormalised(probs, [0, 1, 2]))
    # top_k overrides filter_thres (which alone would keep ceil(0.1 * 5) = 1 token)
    assert_distribution(frequencies(LOGITS, temperature=1.0, filter_thres=0.9, top_k=4), renormalised(probs, [0, 1, 2, 3]))


def test_top_p_keeps_the_smallest_set_reaching_p_and_renormalises():
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = torch.tensor(probs).log()
    # cumulative 0.5, 0.8, 0.95, 1.0: p=0.7 needs two tokens, p=0.8 still two, p=0.81 three
    for p, keep in [(0.4, [0]), (0.7, [0, 1]), (0.8, [0, 1]), (0.81, [0, 1, 2]), (1.0, [0, 1, 2, 3])]:
        observed = frequencies(logits, temperature=1.0, filter_thres=None, top_p=p)
        assert_distribution(observed, renormalised(probs, keep))


def test_top_p_applies_to_the_distribution_after_temperature_and_top_k():
    probs = [0.4, 0.3, 0.2, 0.1]
    logits = torch.tensor(probs).log()
    # top_k=3 renormalises to 4/9, 3/9, 2/9 (cumulative 0.44, 0.78): p=0.75 then keeps two.
    # (On the original probabilities, cumulative 0.4, 0.7, 0.9, it would keep three.)
    observed = frequencies(logits, temperature=1.0, top_k=3, top_p=0.75)
    assert_distribution(observed, renormalised(probs, [0, 1]))
    # temperature 2 flattens 0.4, 0.3, 0.2, 0.1 to weights sqrt(p): cumulative 0.32, 0.60, 0.83, 1.0,
    # so p=0.62 keeps three (at temperature 1 it would keep two)
    flat = [math.sqrt(p) for p in probs]
    observed = frequencies(logits, temperature=2.0, filter_thres=None, top_p=0.62)
    assert_distribution(observed, renormalised([f / sum(flat) for f in flat], [0, 1, 2]))


def test_filter_thres_keeps_exactly_the_top_fraction():
    torch.manual_seed(0)
    logits = torch.randn(100)
    # filter_thres 0.9 keeps ceil(0.1 * 100) = 10 tokens, 0.95 keeps 5, as in the seed
    for thres, k in [(0.9, 10), (0.95, 5)]:
        top = logits.topk(k).indices.tolist()
        expected = renormalised((logits / 2.0).softmax(-1).tolist(), top)
        observed = frequencies(logits, temperature=2.0, filter_thres=thres)
        assert_distribution(observed, expected)
        assert set(observed.nonzero().flatten().tolist()) == set(top)  # every kept token is drawn


def test_greedy_and_single_token_filters_pick_the_argmax():
    torch.manual_seed(1)
    logits = torch.randn(6, 50)
    greedy = logits.argmax(-1)
    g = torch.Generator().manual_seed(0)
    assert torch.equal(sample(logits, temperature=0), greedy)
    assert torch.equal(sample(logits, temperature=5.0, top_k=1, generator=g), greedy)
    assert torch.equal(sample(logits, temperature=5.0, filter_thres=None, top_p=1e-6, generator=g), greedy)


def test_rows_are_drawn_independently():
    # two different rows in one batch each follow their own distribution
    rows = torch.stack([LOGITS, LOGITS.flip(0)]).repeat(DRAWS // 2, 1)
    drawn = sample(rows, temperature=1.0, filter_thres=None, generator=torch.Generator().manual_seed(0))
    first = torch.bincount(drawn[0::2], minlength=5).double() / (DRAWS // 2)
    second = torch.bincount(drawn[1::2], minlength=5).double() / (DRAWS // 2)
    expected = LOGITS.softmax(-1).double()
    bound = 5 * (expected * (1 - expected) / (DRAWS // 2)).sqrt() + 0.002
    assert ((first - expected).abs() <= bound).all() and ((second - expected.flip(0)).abs() <= bound).all()
