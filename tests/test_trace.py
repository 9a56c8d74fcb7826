"""Causal tracing (kn_ray.engine.tracing) against a straightforward float64 reference
(tests/reference_trace.py: one restoration, one sample, one forward at a time), on every tiny
causal family, and its invariants."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kn_ray.engine import load_model
from kn_ray.engine.tracing import KINDS, MASKED_REASON, Tracer, embedding_std, token_roles, window_layers
from tests.numerics import assert_same_numbers
from tests.reference import float64
from tests.reference_trace import reference_trace
from tests.tiny_models import CAUSAL_CASES, CONFIGS, MASKED, MASKED_CASES, tiny_model

CAUSAL = [f for f in CONFIGS if f not in MASKED]
SUBJECTS = ["france", "rome", "city", "paris"]  # of CAUSAL_CASES: mid-prompt, first token, ...


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("family", CAUSAL)
def test_trace_equals_the_float64_reference(family):
    model, tok = tiny_model(family)
    prompts, targets = CAUSAL_CASES
    tracer = Tracer(model, tok, precision="fp32", max_batch_tokens=16)  # several passes per token
    traces = tracer.trace(prompts[:3], targets[:3], SUBJECTS[:3], samples=2, noise=3.0, window=2, seed=7)
    model64 = float64(model)
    for res in traces:
        assert res.ok, res.reason
        want, p_clean, p_corrupted = reference_trace(model64, family, tok, res.prompt, res.target, res.subject_span,
                                                     samples=2, noise=3.0, window=2, seed=7)
        assert res.p_restored.shape == (3, 3, len(res.tokens)) == want.shape
        assert_same_numbers(res.p_restored, want, what=f"{family} {res.prompt!r} p_restored")
        assert_same_numbers([res.p_clean, res.p_corrupted], [p_clean, p_corrupted], what=f"{family} p")
        assert res.rows == 3 * 3 * 2 * (len(res.tokens) - res.subject_span[0])


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_invariants(family):
    model, tok = tiny_model(family)
    tracer = Tracer(model, tok, precision="fp32")
    prompts, targets = ["the capital of france is", "rome is located in"], [" paris", " italy"]  # one-token targets
    for res in tracer.trace(prompts, targets, ["france", "rome"], samples=3, window=3):
        resid = res.restored("resid")
        s0 = res.subject_span[0]
        # the residual stream of the last layer at the last token is the whole clean state the target reads
        assert_same_numbers(resid[-1, -1], res.p_clean, scale=res.p_clean, what="resid last layer, last token")
        # tokens before the subject are never corrupted: exactly p_corrupted
        assert (res.p_restored[:, :, :s0] == res.p_corrupted).all()
        assert not np.isclose(res.p_clean, res.p_corrupted)  # the noise does something
    for res in tracer.trace(prompts, targets, ["france", "rome"], samples=2, noise=0.0, window=3):
        assert res.p_corrupted == pytest.approx(res.p_clean, rel=1e-5)
        assert_same_numbers(res.p_restored, np.full_like(res.p_restored, res.p_clean), what="zero noise")


def test_noise_is_seeded_and_scaled():
    model, tok = tiny_model("llama")
    tracer = Tracer(model, tok, precision="fp32")
    args = (["the capital of france is"], [" paris"], ["france"])
    a, b = tracer.trace(*args, samples=2, seed=3)[0], tracer.trace(*args, samples=2, seed=3)[0]
    c = tracer.trace(*args, samples=2, seed=4)[0]
    assert np.array_equal(a.p_restored, b.p_restored) and not np.array_equal(a.p_restored, c.p_restored)
    std = float(model.get_input_embeddings().weight.double().std(correction=0))
    assert a.noise_std == pytest.approx(3.0 * std, rel=1e-6) and embedding_std(model) == pytest.approx(std, rel=1e-6)


def test_subject_spans_roles_and_skips(tmp_path):
    model, tok = tiny_model("llama")
    tracer = Tracer(model, tok, precision="fp32")
    res = tracer.trace(["paris was born in the city of new york", "the capital of france is", "a city of", "rome is"],
                       [" london", " paris", " rome", " italy"], ["new york", "germany", "city", "rome"],
                       samples=1, kinds=("mlp",))
    assert res[0].subject_span == (7, 9) and res[0].roles[-3:] == ["before", "subject_first", "subject_last"]
    assert res[1].status == "skipped" and "not found" in res[1].reason
    assert res[2].roles == ["before", "subject_last", "last"] and res[2].kinds == ("mlp",)
    assert res[3].roles == ["subject_last", "last"] and res[3].p_restored.shape == (1, 3, 2)
    assert token_roles(6, (1, 4)) == ["before", "subject_first", "subject_middle", "subject_last", "further", "last"]
    assert list(window_layers(0, 10, 30)) == list(range(0, 5)) and list(window_layers(12, 10, 30)) == list(range(7, 17))
    assert list(window_layers(29, 10, 30)) == list(range(24, 30)) and list(window_layers(4, 1, 30)) == [4]

    bert, btok = tiny_model("bert", tmp_path)
    out = Tracer(bert, btok).trace(MASKED_CASES[0][:1], MASKED_CASES[1][:1], ["france"])
    assert out[0].status == "skipped" and out[0].reason == MASKED_REASON
    with pytest.raises(ValueError, match="kinds"):
        tracer.trace(["a"], ["b"], ["a"], kinds=("mlp", "nope"))


def test_smollm2_traces_the_subject():
    """The real model on a fact it knows: restoring a subject token's residual stream in the
    lower half of the layers recovers much of P(gold) (the subject carries the fact there);
    restoring the whole clean state at the end recovers all of it."""
    lm = load_model("smollm2")
    res = Tracer(lm, precision="fp32").trace(["The Eiffel Tower is located in the city of"], [" Paris"],
                                             ["The Eiffel Tower"], samples=2, kinds=("resid",))[0]
    assert res.ok and res.p_clean > 0.3 and res.p_corrupted < 0.5 * res.p_clean
    assert res.subject_span == (0, 4) and res.roles[:4] == ["subject_first", "subject_middle", "subject_middle", "subject_last"]
    assert_same_numbers(res.restored("resid")[-1, -1], res.p_clean, scale=res.p_clean)
    lower_half_subject = res.restored("resid")[: lm.num_layers // 2, :4]
    assert lower_half_subject.max() > res.p_corrupted + 0.5 * (res.p_clean - res.p_corrupted)
