"""The embedded real model: it knows easy facts, and its top IG neurons carry them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import spearmanr

from kn_ray.engine import Attributor, Prober, load_model
from kn_ray.engine.precision import cpu_has_native_bf16
from numerics import BF16_RHO_MIN, BF16_SHARED_MIN

pytestmark = pytest.mark.slow

FACTS = (
    ["The capital of France is", "The capital of Germany is", "The capital of Japan is"],
    [" Paris", " Berlin", " Tokyo"],
)
# Without native bf16 (AVX2-only CPUs such as AMD EPYC, or ATEN_CPU_CAPABILITY=avx2) torch
# emulates bf16 about 10x slower than fp32: there the attributions cover one fact, the two top
# layers (3072 neurons to rank) and 10 steps, which keeps this module to seconds.
if cpu_has_native_bf16():
    CASE, CASE_FACTS = dict(n_steps=20, layers=None), FACTS
else:
    CASE, CASE_FACTS = dict(n_steps=10, layers=[28, 29]), ([FACTS[0][0]], [FACTS[1][0]])


@pytest.fixture(scope="module")
def smollm2():
    return load_model("smollm2", device="cpu")


@pytest.fixture(scope="module")
def fp32_results(smollm2):
    return Attributor(smollm2, precision="fp32").attribute(*CASE_FACTS, **CASE)


def test_knows_the_capital_of_france(smollm2):
    [probe] = Prober(smollm2, precision="fp32").probe(["The capital of France is"], [" Paris"])
    assert probe.gold_prob > 0.5 and probe.top_token == " Paris"


def test_top_neurons_matter_more_than_random_ones(smollm2, fp32_results):
    res = fp32_results[0]
    top = [(layer, neuron) for layer, neuron, _ in res.top_neurons(5)]
    rng = np.random.default_rng(0)
    random = [(layer, int(rng.integers(smollm2.num_neurons))) for layer, _ in top]
    prober = Prober(smollm2, precision="fp32")
    prompt, target = FACTS[0][0], FACTS[1][0]
    [clean] = prober.probe([prompt], [target])
    [without_top] = prober.probe([prompt], [target], neurons=[top], factor=0.0)
    [without_random] = prober.probe([prompt], [target], neurons=[random], factor=0.0)
    assert clean.gold_prob - without_top.gold_prob > clean.gold_prob - without_random.gold_prob


def assert_ranks_like(fp32, other) -> None:
    """Same neuron ranking: Spearman over all scores and the top 10 shared."""
    rho = spearmanr(fp32.scores.ravel(), other.scores.ravel()).statistic
    shared = {n[:2] for n in fp32.top_neurons(10)} & {n[:2] for n in other.top_neurons(10)}
    assert rho >= BF16_RHO_MIN, rho
    assert len(shared) >= BF16_SHARED_MIN, shared


def test_bf16_ranks_neurons_like_fp32(smollm2, fp32_results):
    bf16 = Attributor(smollm2, precision="bf16").attribute(*CASE_FACTS, **CASE)
    for a, b in zip(fp32_results, bf16):
        assert_ranks_like(a, b)


def test_bf16_weights_rank_neurons_like_fp32_weights(fp32_results):
    """Half the weight memory: bf16 weights (bf16 compute, fp32 accumulation) against fp32 weights.
    Measured (README, "Big models"): Spearman 0.996-0.997, 9-10 of the top 10 shared. On CPUs
    without native bf16 the case is the smaller CASE above."""
    lm = load_model("smollm2", device="cpu", dtype="bf16")
    assert lm.dtype == torch.bfloat16
    attr = Attributor(lm)  # precision auto follows the weights
    assert attr.precision == "bf16"
    for a, b in zip(fp32_results, attr.attribute(*CASE_FACTS, **CASE)):
        assert b.scores.dtype == np.float32
        assert_ranks_like(a, b)
        assert b.gold_prob == pytest.approx(a.gold_prob, rel=0.1)
