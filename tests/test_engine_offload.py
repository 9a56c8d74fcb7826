"""Models split by Accelerate: offloaded to CPU/disk, the engine's numbers do not change."""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import Attributor, LoadedModel, load_model, quadrature
from kn_ray.engine.loading import parse_max_memory
from reference import float64, reference_ig
from numerics import assert_same_numbers, relative_error as rel_err
from test_engine_exact import cases
from tiny_models import CONFIGS, MASKED, tiny_model

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them

CAP = {"cpu": "64KiB"}  # smaller than one block: every block is offloaded to disk


def saved(family, tmp_path):
    """(the tiny model, a LoadedModel of it, a checkpoint dir of it)."""
    model, tok = tiny_model(family, tmp_path)
    path = tmp_path / family
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, LoadedModel.from_objects(model, tok), path


def offloaded_copy(resident: LoadedModel, path, folder) -> LoadedModel:
    lm = load_model(str(path), dtype="fp32", max_memory=CAP, offload_folder=folder)
    lm.tokenizer = resident.tokenizer  # the same tokenizer object (a reload may pick another class)
    return lm


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_disk_offload_gives_the_same_scores(family, tmp_path):
    model, resident, path = saved(family, tmp_path)
    offload = offloaded_copy(resident, path, tmp_path / "offload")
    assert offload.offloaded and not resident.offloaded
    assert "disk" in set(offload.model.hf_device_map.values())
    assert offload.device.type == "cpu"  # the input device, though most parameters are on `meta`
    prompts, targets = cases(family)
    n_steps = 3
    small = dict(max_batch_tokens=7)  # several row chunks per layer
    want = Attributor(resident, precision="fp32").attribute(prompts, targets, n_steps=n_steps)
    got = Attributor(offload, precision="fp32", **small).attribute(prompts, targets, n_steps=n_steps)
    model64 = float64(model)
    alphas, weights = quadrature(n_steps, "left")
    for i, (prompt, target, g, w) in enumerate(zip(prompts, targets, got, want)):
        assert g.ok, g.reason
        assert_same_numbers(g.scores, w.scores, what="scores")
        assert_same_numbers(g.gold_prob, w.gold_prob, what="gold_prob")
        if i % 2:
            continue  # the float64 reference on every other prompt (single- and multi-token objects)
        for layer in range(model.config.num_hidden_layers):
            ref, p_clean, p_zero = reference_ig(model64, family, resident.tokenizer, prompt, target, layer,
                                                alphas, weights, family in MASKED)
            assert rel_err(g.scores[layer], ref) <= 1e-4
            assert g.baseline_prob[layer] == pytest.approx(p_zero, rel=1e-4)


def test_max_memory_strings_parse_like_accelerate_expects():
    assert parse_max_memory("0=70GiB, 1=70GiB,cpu=200GiB") == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"}
    assert parse_max_memory({"0": "1GiB", "disk": "9GiB"}) == {0: "1GiB", "disk": "9GiB"}
    for bad in ("0:70GiB", "gpu0=1GiB", "=1GiB"):
        with pytest.raises(ValueError, match="max_memory"):
            parse_max_memory(bad)


# Probes and value-slot edits of offloaded models, every family: tests/test_edit_offload.py
