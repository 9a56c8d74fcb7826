"""The engine's integrated gradients equal an independent float64 reference."""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import RULES, Attributor, quadrature
from kn_ray.engine.adaptive import FLOOR
from numerics import assert_same_numbers, relative_error as rel_err
from reference import POST_FFN_NORM, float64, reference_ig
from tiny_models import CONFIGS, MASKED, cases, tiny_model

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them


@pytest.mark.parametrize("family", sorted(CONFIGS))
@pytest.mark.parametrize("rule", RULES)
def test_scores_match_float64_reference(family, rule, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    model64 = float64(model)
    prompts, targets = cases(family)
    n_steps = 4
    alphas, weights = quadrature(n_steps, rule)
    results = Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=n_steps, rule=rule)
    for prompt, target, res in zip(prompts, targets, results):
        assert res.ok, res.reason
        for layer in range(model.config.num_hidden_layers):
            want, p_clean, p_zero = reference_ig(model64, family, tok, prompt, target, layer, alphas, weights,
                                                 family in MASKED, post_norm="frozen" if family in POST_FFN_NORM else "live")
            assert rel_err(res.scores[layer], want) <= 1e-4
            assert res.gold_prob == pytest.approx(p_clean, rel=1e-4)
            assert res.baseline_prob[layer] == pytest.approx(p_zero, rel=1e-4)


def post_normed_model(family, tmp_path):
    """A tiny random model with a norm on the FFN output: Gemma 3 (gain 1 + w), or OLMo 2 and
    Gemma 2 built here (gain w; 1 + w), their norm gains randomised so that they matter."""
    import torch
    from transformers import AutoModelForCausalLM, Gemma2Config, Olmo2Config

    if family == "gemma3_text":
        model, tok = tiny_model(family, tmp_path)
    else:
        from tiny_models import VOCAB, word_tokenizer

        torch.manual_seed(0)
        common = dict(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                      num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64, pad_token_id=0)
        config = (Olmo2Config(initializer_range=0.3, **common) if family == "olmo2" else
                  Gemma2Config(head_dim=8, sliding_window=3, query_pre_attn_scalar=8, initializer_range=0.1, **common))
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()
        tok = word_tokenizer()
    with torch.no_grad():
        for block in model.model.layers:
            block.post_feedforward_layernorm.weight.add_(0.3 * torch.randn(32))
    return model, tok


@pytest.mark.parametrize("family", sorted(POST_FFN_NORM))
@pytest.mark.parametrize("post_norm", ["frozen", "live"])
def test_post_normed_ffn_paths_match_float64_reference(family, post_norm, tmp_path):
    """Both paths of a post-normed FFN (Gemma 2/3, OLMo 2) against the reference: `frozen` (the
    default) divides the normed FFN output at the target by its clean RMS, `live` by its own.
    On the frozen path 64 Gauss-Legendre nodes meet completeness (its P(baseline): the FFN output
    removed at the target); the live path's integrand jumps near alpha = 0, where the norm's eps
    takes over, and 64 nodes miss it by per cents even here."""
    model, tok = post_normed_model(family, tmp_path)
    model64 = float64(model)
    prompts, targets = cases(family)
    alphas, weights = quadrature(6, "gausslegendre")
    kw = {} if post_norm == "frozen" else dict(post_norm=post_norm)  # frozen: the default
    attr = Attributor(model, tok, precision="fp32")
    results = attr.attribute(prompts, targets, n_steps=6, rule="gausslegendre", **kw)
    for prompt, target, res in zip(prompts, targets, results):
        assert res.ok, res.reason
        for layer in range(model.config.num_hidden_layers):
            want, p_clean, p_zero = reference_ig(model64, family, tok, prompt, target, layer, alphas, weights, False,
                                                 post_norm=post_norm)
            assert rel_err(res.scores[layer], want) <= 1e-4
            assert res.gold_prob == pytest.approx(p_clean, rel=1e-4)
            assert res.baseline_prob[layer] == pytest.approx(p_zero, rel=1e-4)
    if post_norm == "frozen":
        for res in attr.attribute(prompts, targets, n_steps=64, rule="gausslegendre"):
            assert rel_err(res.scores.sum(-1), res.gold_prob - res.baseline_prob) <= 1e-3
        # and it differs from the live path (the gains and the RMS matter)
        live = attr.attribute(prompts, targets, n_steps=6, rule="gausslegendre", post_norm="live")
        assert all(rel_err(f.scores, g.scores) > 1e-2 for f, g in zip(results, live))


def test_frozen_norm_makes_the_normed_ffn_output_linear_in_alpha(tmp_path, monkeypatch):
    """On the frozen path the normed FFN output at the target is alpha x its clean value."""
    import contextlib

    import torch

    from kn_ray.engine import attribution

    model, tok = post_normed_model("gemma3_text", tmp_path)
    attr = Attributor(model, tok, precision="fp32")
    outs, engine_hook = [], attribution.output_hook

    @contextlib.contextmanager
    def and_keep(module, fn):  # the engine's hook, then one that keeps what it returned
        with engine_hook(module, fn), engine_hook(module, lambda _x, out: outs.append(out[:, -1].clone()) or out):
            yield

    monkeypatch.setattr(attribution, "output_hook", and_keep)
    alphas = quadrature(4, "trapezoid")[0].float()
    attr.attribute(["the city of"], [" rome"], n_steps=4, rule="trapezoid", layers=[1])
    [out] = outs
    clean = out[-1]
    assert torch.allclose(out, alphas[:, None] * clean, atol=1e-6 * float(clean.abs().max()))
    with pytest.raises(ValueError, match="post_norm"):
        attr.attribute(["the city of"], [" rome"], post_norm="none")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_layer_subset_and_batch_size_do_not_change_scores(family, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    full = Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=3)
    small = Attributor(model, tok, precision="fp32", max_batch_prompts=1, max_batch_tokens=5)
    part = small.attribute(prompts, targets, n_steps=3, layers=[2, 0])
    for f, p in zip(full, part):
        assert p.layers == (0, 2)
        assert_same_numbers(p.scores, f.scores[[0, 2]], what="scores")


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_completeness_midpoint_200_steps(family, tmp_path):
    """sum_i score_i ~= P(x) - P(layer zeroed): the residual is <= 1% of that change."""
    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    for res in Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=200, rule="midpoint"):
        change = np.abs(res.gold_prob - res.baseline_prob)
        assert np.all(res.completeness <= 0.01 * change), (res.completeness, change)
        assert rel_err(res.scores.sum(-1), res.gold_prob - res.baseline_prob) <= 0.01


def test_rules_integrate_polynomials():
    """Each rule integrates what it must exactly: Gauss-Legendre m nodes up to degree 2m - 1."""
    for m in (1, 4, 6, 12):
        alphas, weights = quadrature(m, "gausslegendre")
        assert alphas.min() > 0 and alphas.max() < 1 and float(weights.sum()) == pytest.approx(1, abs=1e-14)
        for degree in range(2 * m):
            assert float((weights * alphas**degree).sum()) == pytest.approx(1 / (degree + 1), rel=1e-12)
        if m <= 6:  # and not degree 2m (above that the miss is below rounding)
            assert float((weights * alphas ** (2 * m)).sum()) != pytest.approx(1 / (2 * m + 1), rel=1e-12)
    for rule in RULES:
        assert float(quadrature(7, rule)[1].sum()) == pytest.approx(1, abs=1e-14)
    with pytest.raises(ValueError, match="n_steps"):
        quadrature(0, "gausslegendre")


def test_romberg_weights_equal_a_romberg_table():
    from scipy.integrate import trapezoid

    from kn_ray.engine.quadrature import romberg_weights
    from kn_ray.engine.model_runner import batches

    f = lambda x: np.exp(3 * x) / (1 + np.exp(6 * x - 3))  # a sigmoid-shaped path, like P(alpha)
    for level in range(5):
        alphas, weights = romberg_weights(level)
        assert len(alphas) == len(set(alphas.tolist())) == 2**level + 1 and bool((weights > 0).all())
        table = [[trapezoid(f(np.linspace(0, 1, 2**j + 1)), dx=1 / 2**j)] for j in range(level + 1)]
        for j in range(1, level + 1):
            for k in range(1, j + 1):
                table[j].append(table[j][k - 1] + (table[j][k - 1] - table[j - 1][k - 1]) / (4**k - 1))
        assert float((weights.numpy() * f(alphas.numpy())).sum()) == pytest.approx(table[level][level], rel=1e-12)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_auto_steps_meet_tolerance_and_match_a_fine_rule(family, tmp_path):
    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    attr = Attributor(model, tok, precision="fp32")
    tol = 1e-3
    auto = attr.attribute(prompts, targets, n_steps="auto", tolerance=tol)
    fine = attr.attribute(prompts, targets, n_steps=48, rule="gausslegendre")
    for a, f in zip(auto, fine):
        change = np.abs(a.gold_prob - a.baseline_prob)
        capped = a.evaluations == 65
        bound = tol * np.maximum(change, FLOOR * a.gold_prob)
        assert np.all((a.completeness <= bound * (1 + 1e-3)) | capped), (a.completeness, bound, a.evaluations)
        assert set(a.evaluations.tolist()) <= {5, 9, 17, 33, 65} and not capped.all()
        assert np.all((a.score_error <= tol) | capped), (a.score_error, a.evaluations)
        # the score error, relative to max(||s||, FLOOR P), bounds each layer's real error (pessimistic)
        real = np.linalg.norm(a.scores - f.scores, axis=1) / np.maximum(np.linalg.norm(f.scores, axis=1),
                                                                       FLOOR * a.gold_prob)
        assert np.all(real <= np.maximum(a.score_error, 1e-5)), (real, a.score_error)
        assert rel_err(a.scores, f.scores) <= 5e-3
        assert_same_numbers(a.baseline_prob, f.baseline_prob, what="baseline_prob")
    assert set(fine[0].evaluations.tolist()) == {49}  # 48 nodes + the baseline row
    assert all(np.isnan(f.score_error).all() for f in fine)  # a fixed rule estimates no error


def test_evaluations_count_the_rows_of_each_rule(tmp_path):
    model, tok = tiny_model("llama", tmp_path)
    attr = Attributor(model, tok, precision="fp32")
    for rule, rows in (("left", 20), ("midpoint", 21), ("trapezoid", 21), ("gausslegendre", 21)):
        [res] = attr.attribute(["the city of"], [" rome"], n_steps=20, rule=rule)
        assert res.evaluations.tolist() == [rows] * 3


@pytest.mark.parametrize("family, fixed", [("llama", 1e9), ("bert", 0)])
def test_auto_passes_follow_the_cost_model(family, fixed, tmp_path, monkeypatch):
    """`auto` runs the first nodes and each doubling in the passes the cost model chooses: with
    a pass's fixed cost far above any recomputation, ONE pass per stage over all (prompt, layer)
    pairs of a batch (starting at the lowest layer); with no fixed cost, one pass per layer (a
    shared pass would only recompute blocks). With a tolerance no pair meets, every pair runs to
    the cap (here 17 nodes): the scores must then be the fixed 17-node Romberg rule's, computed
    layer by layer, whatever the passes."""
    from kn_ray.engine import adaptive, pass_plan
    from kn_ray.engine.adaptive import FIRST_LEVEL
    from kn_ray.engine.quadrature import romberg_weights
    from kn_ray.engine.model_runner import batches

    model, tok = tiny_model(family, tmp_path)
    prompts, targets = cases(family)
    attr = Attributor(model, tok, precision="fp32", max_batch_tokens=10**6)
    passes, real_rows = [], attr._rows

    def counted_rows(batch, clean, layer, pi, alpha, baseline):
        layers = {layer} if isinstance(layer, int) else set(layer.tolist())
        passes.append((layers, set(pi.tolist())))
        return real_rows(batch, clean, layer, pi, alpha, baseline)

    attr._rows = counted_rows
    monkeypatch.setattr(adaptive, "MAX_LEVEL", MAX_LEVEL := FIRST_LEVEL + 2)
    monkeypatch.setitem(pass_plan.FIXED_ROW_TOKENS, "cpu", fixed)
    auto = attr.attribute(prompts, targets, n_steps="auto", tolerance=1e-12)
    L = model.config.num_hidden_layers
    assert all(r.evaluations.tolist() == [2**MAX_LEVEL + 1] * L for r in auto)
    _, _, encs, _ = attr._prepare(prompts, targets)
    groups = list(batches(encs, len(encs)))  # the engine's batches: one per object length
    stages = 1 + MAX_LEVEL - FIRST_LEVEL  # the first nodes, then each doubling
    assert all(len(group) > 1 for group in groups)
    if fixed:
        assert len(passes) == len(groups) * stages
        assert all(layers == set(range(L)) for layers, _ in passes)
    else:
        assert len(passes) == len(groups) * stages * L
        assert sorted(min(layers) for layers, _ in passes) == sorted(list(range(L)) * len(groups) * stages)
        assert all(len(layers) == 1 for layers, _ in passes)
    sizes = sorted(len(rows) for _, rows in passes)
    assert sizes == sorted(len(g) for g in groups for _ in range(len(passes) // len(groups)))
    alphas, weights = romberg_weights(MAX_LEVEL)
    fixed_rule = Attributor(model, tok, precision="fp32")
    for group in groups:
        outs = fixed_rule._attribute_batch([e for _, e in group], (alphas, weights), None, list(range(L)), 0.0)
        for (i, _), out in zip(group, outs):
            assert_same_numbers(auto[i].scores, out["scores"], what="scores")
            assert_same_numbers(auto[i].baseline_prob, out["baseline_prob"], what="baseline_prob")


def test_layer_groups_are_the_cheapest_contiguous_split():
    """The dynamic programme finds the least-cost split into contiguous layer groups: checked
    against every split (2^(d-1) of d layers) on random rows, costs and pass sizes."""
    import itertools

    from kn_ray.engine.pass_plan import layer_groups, pass_cost

    rng = np.random.default_rng(0)
    for _ in range(300):
        n_layers = int(rng.integers(1, 13))
        d = int(rng.integers(1, n_layers + 1))
        layers = sorted(rng.choice(n_layers, d, replace=False).tolist())
        rows = rng.integers(1, 200, d).tolist()
        model = dict(n_layers=n_layers, tokens=int(rng.integers(1, 12)), fixed=float(rng.choice([0, 1, 12, 256, 1e6])),
                     head=float(rng.uniform(0, 10)), rows_per_pass=int(rng.choice([1, 50, 10**6])))

        def cost(split):
            return sum(pass_cost(layers[i], sum(rows[i:j]), **model) for i, j in split)

        best = min(cost(list(zip((0,) + cuts, cuts + (d,))))
                   for k in range(d) for cuts in itertools.combinations(range(1, d), k))
        got = layer_groups(layers, rows, **model)
        assert [i for i, _ in got][0] == 0 and got[-1][1] == d
        assert all(a[1] == b[0] for a, b in zip(got, got[1:]))
        assert cost(got) == pytest.approx(best, rel=1e-12)
