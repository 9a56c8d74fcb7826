"""EAP-IG edge scores equal an edge-by-edge float64 reference; completeness; faithfulness ends."""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import quadrature
from kn_ray.engine.adapters import UnsupportedArchitecture
from kn_ray.engine.circuits import EdgeAttributor
from kn_ray.engine.graph import Graph
from reference import float64
from reference_edges import PATHS, reference_edges
from tiny_models import tiny_model

# clean / corrupted prompts of the same length; one two-token object; ragged lengths in one batch
PROMPTS = ["the capital of france is", "paris was born in the city of", "rome is located in"]
CORRUPTED = ["the capital of italy is", "rome was born in the city of", "paris is located in"]
TARGETS = [" paris", " san francisco", " italy"]
OTHERS = [" rome", " new york", " france"]


def scale_err(got, want):
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family", sorted(PATHS))
def test_edge_scores_match_edge_by_edge_float64_reference(family, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    model64 = float64(model)
    eap = EdgeAttributor(model, tok, precision="fp32")
    alphas, weights = quadrature(2, "gausslegendre")
    metric = "logit_diff" if family == "llama" else "logprob"
    results = eap.attribute_edges(PROMPTS, TARGETS, CORRUPTED, corrupted_targets=OTHERS, n_steps=2, metric=metric)
    for i in (0, 1):  # a padded row of a two-prompt batch, and a two-token object
        res = results[i]
        assert res.ok, res.reason
        want, m_clean, m_corr = reference_edges(model64, family, tok, PROMPTS[i], CORRUPTED[i], TARGETS[i], alphas,
                                                weights, metric, OTHERS[i])
        assert res.scores.shape == want.shape == (eap.graph.num_senders, eap.graph.num_receivers)
        assert np.array_equal(res.scores != 0, want != 0)  # the same edges exist
        assert scale_err(res.scores, want) <= 1e-4
        # log P / logit differences: their error is absolute
        assert abs(res.clean_metric - m_clean) <= 1e-4 and abs(res.corrupted_metric - m_corr) <= 1e-4


@pytest.mark.parametrize("family", sorted(PATHS))
def test_edges_into_the_logits_sum_to_the_metric_change(family, tmp_path):
    """Completeness at the logits: sum_u score(u -> logits) -> M(clean) - M(corrupted) as the rule's
    nodes grow. It holds only if every sender's output is recorded and enters the sum (their sum is
    the final residual stream), so a missing or double-counted sender fails it."""
    model, tok = tiny_model(family, tmp_path)
    eap = EdgeAttributor(model, tok, precision="fp32")
    assert eap.graph.valid[:, -1].all()  # every sender writes into the logits
    metric = "logit_diff" if family == "gemma" else "logprob"
    coarse, fine = (eap.attribute_edges(PROMPTS, TARGETS, CORRUPTED, corrupted_targets=OTHERS, n_steps=n, metric=metric)
                    for n in (2, 12))
    for c, f in zip(coarse, fine):
        into_logits = float(f.scores[:, -1].astype(np.float64).sum())
        assert f.completeness == pytest.approx(abs(into_logits - f.change), abs=1e-5)
        scale = np.abs(f.scores[:, -1]).sum()
        assert f.completeness <= 1e-5 * scale, (f.completeness, scale)  # rounding
        assert f.completeness <= c.completeness + 1e-5
        # no single sender could be dropped unnoticed: each non-negligible edge exceeds the residual
        big = np.abs(f.scores[:, -1]) > 1e-3 * np.abs(f.scores[:, -1]).max()
        assert (np.abs(f.scores[big, -1]) > f.completeness).all()
    assert sum(c.completeness for c in coarse) > 10 * sum(f.completeness for f in fine)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_input_residual_falls_as_the_rule_gets_finer(family, tmp_path):
    """Integrated gradients along the embedding path (the one every receiver but the logits
    follows): the residual falls as the nodes grow (random tiny models have sharp paths: 4 nodes
    miss by up to 90%, 128 Gauss-Legendre nodes by < 0.2%)."""
    model, tok = tiny_model(family, tmp_path)
    eap = EdgeAttributor(model, tok, precision="fp32")
    coarse, fine = (eap.attribute_edges(PROMPTS, TARGETS, CORRUPTED, n_steps=n) for n in (4, 128))
    for c, f in zip(coarse, fine):
        assert f.input_residual <= 2e-3 * abs(f.change) + 1e-5
        assert f.input_residual <= c.input_residual + 1e-5
    assert sum(f.input_residual for f in fine) < 0.1 * sum(c.input_residual for c in coarse)


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_faithfulness_is_one_with_every_edge_and_zero_with_none(family, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    eap = EdgeAttributor(model, tok, precision="fp32")
    [res] = eap.attribute_edges(PROMPTS[1:2], TARGETS[1:2], CORRUPTED[1:2], n_steps=2)
    valid = eap.graph.valid
    faith = eap.faithfulness(res, np.stack([valid, np.zeros_like(valid)]))
    np.testing.assert_allclose(faith, [1.0, 0.0], rtol=0, atol=1e-4)


def test_graph_edges():
    g = Graph(layers=2, heads=2)
    assert g.senders == ["input", "a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1"]
    assert g.receivers == ["a0.h0", "a0.h1", "m0", "a1.h0", "a1.h1", "m1", "logits"]
    # input -> all 7; a0.* -> m0, layer 1 (3), logits = 5 each; m0 -> layer 1 + logits = 4; a1.* -> m1, logits; m1 -> logits
    assert g.num_edges == 7 + 2 * 5 + 4 + 2 * 2 + 1
    assert Graph(layers=2, heads=2, parallel=True).num_edges == g.num_edges - 2 - 2


def test_post_ln_families_are_refused(tmp_path):
    model, tok = tiny_model("bert", tmp_path)
    with pytest.raises(UnsupportedArchitecture, match="residual stream"):
        EdgeAttributor(model, tok)


def test_faithfulness_curve_keeps_the_top_edges_and_random_ones_of_the_same_size(tmp_path):
    from kn_ray.engine.faithfulness import circuit_mask, faithfulness_curve

    model, tok = tiny_model("gpt2", tmp_path)
    eap = EdgeAttributor(model, tok, precision="fp32")
    [res] = eap.attribute_edges(PROMPTS[:1], TARGETS[:1], CORRUPTED[:1], n_steps=2)
    curve = faithfulness_curve(eap, res, fractions=(0.05, 0.5, 1.0), n_random=2, seed=1)
    assert curve.edges.tolist() == [round(0.05 * eap.graph.num_edges), round(0.5 * eap.graph.num_edges), eap.graph.num_edges]
    np.testing.assert_allclose([curve.circuit[-1], *curve.random[:, -1]], 1.0, atol=1e-4)  # every edge kept
    k = int(curve.edges[0])
    mask = circuit_mask(res.scores, eap.graph, k)
    kept = np.abs(res.scores[mask])
    assert mask.sum() == k and kept.min() >= np.abs(res.scores[eap.graph.valid & ~mask]).max()
    again = faithfulness_curve(eap, res, fractions=(0.05, 0.5, 1.0), n_random=2, seed=1)
    np.testing.assert_array_equal(again.random, curve.random)  # seeded
    np.testing.assert_allclose(eap.faithfulness(res, mask[None]), curve.circuit[:1], atol=1e-6)


def test_logit_diff_against_an_object_with_the_same_first_token_is_skipped(tmp_path):
    """" san francisco" against " san" (or " paris" against " paris france"): the metric would be
    exactly 0 and every edge 0; the engine skips the prompt with the reason instead."""
    model, tok = tiny_model("llama", tmp_path)
    eap = EdgeAttributor(model, tok, precision="fp32")
    same, other = eap.attribute_edges(PROMPTS[1:3], TARGETS[1:3], CORRUPTED[1:3], corrupted_targets=[" san", " france"],
                                      n_steps=2, metric="logit_diff")
    assert same.status == "skipped" and "starts with the gold's first token" in same.reason
    assert other.ok and other.change != 0
