"""The engine's integrated gradients equal an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import METHODS, Attributor, riemann
from reference import float64, reference_ig
from tiny_models import CONFIGS, MASKED, tiny_model

CAUSAL_CASES = (
    ["the capital of france is", "rome is located in", "the city of", "paris was born in the city of"],
    [" paris", " italy", " new york", " san francisco"],  # single- and multi-token objects, ragged lengths
)
MASKED_CASES = (
    ["the capital of france is [MASK] .", "[MASK] is the capital of italy", "paris is located in [MASK] ."],
    ["paris", "rome", "france"],
)


def cases(family):
    return MASKED_CASES if family in MASKED else CAUSAL_CASES


def rel_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("method", METHODS)
def test_scores_match_float64_reference(family, method, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    model64 = float64(model)
    prompts, targets = cases(family)
    n_steps = 4
    alphas, weights = riemann(n_steps, method)
    results = Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=n_steps, method=method)
    for prompt, target, res in zip(prompts, targets, results):
        assert res.ok, res.reason
        for layer in range(model.config.num_hidden_layers):
            want, p_clean, p_zero = reference_ig(model64, family, tok, prompt, target, layer, alphas, weights, family in MASKED)
            assert rel_err(res.scores[layer], want) <= 1e-4
            assert res.gold_prob == pytest.approx(p_clean, rel=1e-4)
            assert res.baseline_prob[layer] == pytest.approx(p_zero, rel=1e-4)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_layer_subset_and_batch_size_do_not_change_scores(family, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    full = Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=3)
    small = Attributor(model, tok, precision="fp32", max_batch_prompts=1, max_batch_tokens=5)
    part = small.attribute(prompts, targets, n_steps=3, layers=[2, 0])
    for f, p in zip(full, part):
        assert p.layers == (0, 2)
        np.testing.assert_allclose(p.scores, f.scores[[0, 2]], rtol=1e-4, atol=1e-5 * np.abs(f.scores).max())


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_completeness_midpoint_200_steps(family, tmp_path):
    """sum_i score_i ~= P(x) - P(layer zeroed): the residual is <= 1% of that change."""
    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    for res in Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=200, method="midpoint"):
        change = np.abs(res.gold_prob - res.baseline_prob)
        assert np.all(res.completeness <= 0.01 * change), (res.completeness, change)
        np.testing.assert_allclose(res.scores.sum(-1), res.gold_prob - res.baseline_prob, rtol=0.01)
