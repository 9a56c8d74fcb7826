"""Named sites read what the model computes, and heads are attributed like neurons."""

from __future__ import annotations

import pytest
import torch

from kn_ray.engine import Attributor, adapter_for, quadrature
from kn_ray.engine.adapters import attention_shape, value_matrix
from kn_ray.engine.sites import capture, parse_site, site_names
from reference import ATTN_OUT, float64, reference_ig
from numerics import assert_same_numbers, relative_error as rel_err
from test_engine_exact import cases
from tiny_models import CONFIGS, MASKED, tiny_model

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_sites_add_up_to_the_residual_stream(family, tmp_path):
    """Pre-LN: resid_pre[l+1] = resid_pre[l] + attn_out[l] + mlp_out[l]; heads x W_O + b = attn_out;
    the logits site is the model's output. Post-LN families: the head and logits identities."""
    model, tok = tiny_model(family, tmp_path)
    adapter = adapter_for(model)
    prompt = cases(family)[0][0].replace("[MASK]", tok.mask_token)
    ids = torch.tensor([tok(prompt)["input_ids"]])
    with torch.no_grad(), capture(model, adapter, site_names(adapter, model)) as cache:
        logits = model(input_ids=ids).logits
    torch.testing.assert_close(cache["logits"], logits, rtol=0, atol=0)
    heads, _, head_dim = attention_shape(model.config)
    for layer in range(model.config.num_hidden_layers):
        z = cache[f"blocks.{layer}.attn.hook_z"]
        assert z.shape == (1, ids.shape[1], heads, head_dim)
        o_proj = adapter.attn_out_module(model, layer)
        per_head = torch.einsum("bthe,dhe->bd", z[:, -1:], value_matrix(o_proj).detach().unflatten(1, (heads, head_dim)))
        bias = o_proj.bias.detach() if o_proj.bias is not None else 0
        assert_same_numbers(per_head + bias, cache[f"blocks.{layer}.hook_attn_out"][:, -1], what="heads sum")
        if adapter.residual_of(model) == "post" or layer + 1 == model.config.num_hidden_layers:
            continue
        step = cache[f"blocks.{layer + 1}.hook_resid_pre"] - cache[f"blocks.{layer}.hook_resid_pre"]
        written = cache[f"blocks.{layer}.hook_attn_out"] + cache[f"blocks.{layer}.hook_mlp_out"]
        assert_same_numbers(step, written, what="residual step")
    assert cache["hook_embed"].shape[:2] == ids.shape


def test_site_names_parse_and_refuse():
    assert parse_site("blocks.3.attn.hook_z") == ("attn.hook_z", 3) and parse_site("logits") == ("logits", None)
    for bad in ("blocks.1.logits", "attn.hook_z", "blocks.2.hook_nothing"):
        with pytest.raises(ValueError, match="bad site name"):
            parse_site(bad)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_head_scores_match_float64_reference(family, tmp_path):
    """A head's score = the sum of the float64 reference IG over its head_dim units."""
    model, tok = tiny_model(family, tmp_path)
    model64 = float64(model)
    prompts, targets = cases(family)
    pick = [0] if family in MASKED else [0, 3]  # causal: a one- and a two-token object
    prompts, targets = [prompts[i] for i in pick], [targets[i] for i in pick]
    alphas, weights = quadrature(4, "gausslegendre")
    heads = attention_shape(model.config)[0]
    results = Attributor(model, tok, precision="fp32").attribute(prompts, targets, n_steps=4, rule="gausslegendre",
                                                                 site="attn.hook_z")
    for prompt, target, res in zip(prompts, targets, results):
        assert res.ok and res.site == "attn.hook_z" and res.scores.shape == (3, heads)
        for layer in range(3):
            units, _, p_zero = reference_ig(model64, family, tok, prompt, target, layer, alphas, weights,
                                            family in MASKED, modules=ATTN_OUT, post_norm="live")  # heads: no frozen norm
            assert rel_err(res.scores[layer], units.reshape(heads, -1).sum(-1)) <= 1e-4
            assert res.baseline_prob[layer] == pytest.approx(p_zero, rel=1e-4)
