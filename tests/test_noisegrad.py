"""NoiseGrad / FusionGrad: attribution averaged over models with noisy weights."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from kn_ray.engine import Attributor, adapter_for
from kn_ray.engine.noisegrad import draw, execution_order, modules_from, swapped
from kn_ray.engine.smoothing import embedding_noise
from tests.numerics import assert_same_numbers, relative_error
from tests.tiny_models import CONFIGS, tiny_model

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them

PROMPTS, TARGETS = ["the capital of france is", "the city of", "rome is located in"], [" paris", " rome", " italy"]


close = assert_same_numbers  # two fp32 computations of one quantity (tests/numerics.py)


def by_hand(attr, copies: int, sigma: float, seed: int, stdevs: float | None = None, layers=None):
    """The mean of separate plain runs, each under draw k of the weight noise (and input noise)."""
    runs = []
    for k in range(copies):
        with contextlib.ExitStack() as stack:
            if stdevs is not None:
                stack.enter_context(embedding_noise(attr.model, stdevs, torch.Generator().manual_seed(seed * 1_000_003 + k)))
            stack.enter_context(swapped(list(attr.model.modules()), draw(attr.model, sigma, seed, k)))
            runs.append(attr.attribute(PROMPTS, TARGETS, n_steps=4, layers=layers))
    return [np.mean([run[i].scores for run in runs], axis=0) for i in range(len(PROMPTS))], runs


def test_noisegrad_is_the_seeded_mean_over_noisy_models_and_never_touches_the_weights(tmp_path):
    model, tok = tiny_model("llama", tmp_path)
    params = dict(model.named_parameters())
    stored = {name: p.detach().clone() for name, p in params.items()}
    attr = Attributor(model, tok, precision="fp32")
    plain = attr.attribute(PROMPTS, TARGETS, n_steps=4)
    weights = dict(n_steps=4, nt_samples=2, noise="weights", weight_stdevs=0.2, nt_seed=1)
    one = attr.attribute(PROMPTS, TARGETS, **weights)
    again = attr.attribute(PROMPTS, TARGETS, **weights)
    other = attr.attribute(PROMPTS, TARGETS, **{**weights, "nt_seed": 2})
    fusion = attr.attribute(PROMPTS, TARGETS, **{**weights, "noise": "both", "stdevs": 0.3})
    zero = attr.attribute(PROMPTS, TARGETS, n_steps=4, nt_samples=1, noise="weights", weight_stdevs=0.0)
    # the stored weights: the same Parameter objects, bit for bit, after every noisy run
    assert all(p is params[name] and torch.equal(p, stored[name]) for name, p in model.named_parameters())
    expected, runs = by_hand(attr, 2, 0.2, 1)
    fused, _ = by_hand(attr, 2, 0.2, 1, stdevs=0.3)
    for i, (p, o, a, x, f, z) in enumerate(zip(plain, one, again, other, fusion, zero)):
        for name in ("scores", "activations", "baseline_prob"):  # K = 1, sigma = 0: plain IG, exactly
            assert np.array_equal(getattr(z, name), getattr(p, name)), name
        assert z.gold_prob == p.gold_prob
        np.testing.assert_array_equal(o.scores, a.scores)  # seeded
        assert relative_error(o.scores, p.scores) > 0.05 and relative_error(o.scores, x.scores) > 0.05
        close(o.scores, expected[i])  # the mean over draws = the mean of separate runs under each draw
        close(f.scores, fused[i])  # FusionGrad: each copy draws weight and input noise
        close(o.gold_prob, np.mean([run[i].gold_prob for run in runs]))
        assert o.evaluations.tolist() == [8, 8, 8]  # 2 draws x 4 left nodes (alpha = 0 among them)
        close(o.completeness, np.abs(o.scores.sum(-1) - (o.gold_prob - o.baseline_prob)), scale=max(o.gold_prob, 1e-3))


def test_a_draw_is_shared_by_every_row_of_the_batch(tmp_path):
    """Weight noise is the model's: a prompt gets the same draws in a batch of three as alone
    (input noise, drawn per row, could not promise that)."""
    model, tok = tiny_model("gpt2", tmp_path)
    kw = dict(n_steps=4, nt_samples=2, noise="weights", weight_stdevs=0.3, nt_seed=5)
    batched = Attributor(model, tok, precision="fp32").attribute(PROMPTS, TARGETS, **kw)
    alone = Attributor(model, tok, precision="fp32", max_batch_prompts=1).attribute(PROMPTS, TARGETS, **kw)
    plain = Attributor(model, tok, precision="fp32").attribute(PROMPTS, TARGETS, n_steps=4)
    for b, a, p in zip(batched, alone, plain):
        close(b.scores, a.scores)
        close(b.gold_prob, a.gold_prob)
        assert relative_error(b.gold_prob, p.gold_prob) > 1e-3


def test_draws_are_n_1_sigma_per_weight_and_tied_weights_share_one(tmp_path):
    model, _ = tiny_model("gpt2", tmp_path)  # GPT-2 ties the LM head to the token embeddings
    noisy = draw(model, 0.2, 0, 0)
    assert len(noisy) == len(list(model.parameters()))
    factors = torch.cat([(noisy[id(p)] / p).flatten() for p in model.parameters() if p.dim() == 2])
    assert factors.mean().item() == pytest.approx(1.0, abs=0.01) and factors.std().item() == pytest.approx(0.2, abs=0.01)
    assert not torch.equal(noisy[id(model.transformer.h[0].mlp.c_fc.weight)], draw(model, 0.2, 0, 1)[id(model.transformer.h[0].mlp.c_fc.weight)])
    wte = model.transformer.wte.weight
    with swapped(list(model.modules()), noisy):
        assert model.lm_head.weight is model.transformer.wte.weight is noisy[id(wte)]
    assert model.lm_head.weight is model.transformer.wte.weight is wte


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_above_noises_the_scaled_block_and_everything_after_it(tmp_path, family):
    model, _ = tiny_model(family, tmp_path)
    adapter = adapter_for(model)
    order = execution_order(model, torch.zeros(1, 2, dtype=torch.long))
    blocks = adapter.blocks(model)
    head = {id(p) for p in adapter.head_module(model).parameters()}
    names = {id(p): name.lower() for name, p in model.named_parameters()}
    embeddings = {id(p) for p in model.get_input_embeddings().parameters()}
    for layer in range(len(blocks)):
        noised = {id(p) for m in modules_from(order, blocks[layer]) for p in m.parameters(recurse=False)}
        above = {id(p) for block in blocks[layer:] for p in block.parameters()}
        below = {id(p) for block in blocks[:layer] for p in block.parameters()}
        outside = {id(p) for p in model.parameters()} - above - below - head - embeddings
        assert above | head <= noised and not noised & below
        assert not noised & embeddings - head  # tied embeddings: noised only in the head's slot
        # outside the blocks and the head: the final norm (causal LMs) is noised, the embedding stage is not
        final = {names[i] for i in outside & noised}
        assert all("norm" in n or "ln_f" in n for n in final) and bool(final) == (family not in ("bert", "roberta"))
        assert all("embed" in names[i] or "wpe" in names[i] for i in outside - noised)


def test_above_runs_each_layer_under_its_own_noise(tmp_path):
    model, tok = tiny_model("llama", tmp_path)
    attr = Attributor(model, tok, precision="fp32")
    res = attr.attribute(PROMPTS, TARGETS, n_steps=4, layers=[1, 2], nt_samples=2, noise="weights",
                         noised_weights="above", weight_stdevs=0.3, nt_seed=4)
    order = execution_order(model, torch.zeros(1, 2, dtype=torch.long))
    blocks = attr.adapter.blocks(model)
    for j, layer in enumerate([1, 2]):
        runs = []
        for k in range(2):
            with swapped(modules_from(order, blocks[layer]), draw(model, 0.3, 4, k)):
                runs.append(attr.attribute(PROMPTS, TARGETS, n_steps=4, layers=[layer]))
        for i, r in enumerate(res):
            assert r.layers == (1, 2)
            close(r.scores[j], np.mean([run[i].scores[0] for run in runs], axis=0))
            p_layer = np.mean([run[i].gold_prob for run in runs])
            assert r.completeness[j] == pytest.approx(abs(r.scores[j].sum() - (p_layer - r.baseline_prob[j])), abs=1e-6)


def test_bad_noise_options_are_refused(tmp_path):
    attr = Attributor(*tiny_model("llama", tmp_path), precision="fp32")
    for kw, match in [(dict(noise="grad"), "noise must be one of"), (dict(noised_weights="below"), "noised_weights"),
                      (dict(weight_stdevs=-0.1), "weight_stdevs must be >= 0")]:
        with pytest.raises(ValueError, match=match):
            attr.attribute(PROMPTS, TARGETS, n_steps=2, nt_samples=1, **{"noise": "weights", **kw})
