"""Edits of an offloaded model give the resident model's numbers, on every tiny family.

The model is loaded with max_memory cpu=64KiB and a disk offload folder, so every block (and
with it every FFN output projection) lives on disk behind Accelerate's hooks. The value-slot
edits (`kn-ray edit`'s update and erase, through `EditRunner`'s own functions) and the probe's
neuron scaling (suppress, amplify) must read and write the same numbers as on the resident
copy, and `edited()` must restore them exactly.
"""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import load_model
from kn_ray.engine.editing import edited
from kn_ray.stages.edit.experiments import FACTORS, EditRunner, apply_erase, apply_update, erase_value
from test_engine_exact import cases
from test_engine_offload import offloaded_copy, saved
from tiny_models import CONFIGS
from numerics import assert_same_numbers

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them

SLOTS = [(layer, neuron) for layer in range(3) for neuron in range(layer, 48, 4)]  # a quarter of each layer


def _numbers(probes) -> tuple[np.ndarray, list[int]]:
    assert all(p.status == "ok" for p in probes)
    return np.array([p.gold_prob for p in probes]), [p.top_id for p in probes]


def assert_same_probes(got, want) -> None:
    (g, g_top), (w, w_top) = _numbers(got), _numbers(want)
    assert_same_numbers(g, w, what="gold_prob")
    assert g_top == w_top


def assert_changed(after, before, what: str) -> None:
    """The edit matters: some probability moves by more than 1% (the comparisons are not vacuous)."""
    assert np.abs(_numbers(after)[0] / _numbers(before)[0] - 1).max() > 0.01, what


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_edits_and_probes_of_an_offloaded_model_match_the_resident_model(family, tmp_path):
    _, resident, path = saved(family, tmp_path)
    offload = offloaded_copy(resident, path, tmp_path / "offload")  # max_memory cpu=64KiB: the blocks on disk
    assert offload.offloaded and "disk" in set(offload.model.hf_device_map.values())
    assert_edits_match(resident, offload, family, erase="zero")


def test_edits_of_a_model_wholly_on_disk_match_the_resident_model(tmp_path):
    """Also the input embedding on disk: update and erase-with-unk read word embeddings from it
    (GPT-2: Conv1D projections, the LM head tied to the embedding)."""
    family = "gpt2"
    _, resident, path = saved(family, tmp_path)
    offload = load_model(str(path), dtype="fp32", max_memory={"cpu": "1KiB"}, offload_folder=tmp_path / "offload")
    offload.tokenizer = resident.tokenizer
    assert offload.model.hf_device_map == {"": "disk"}
    assert offload.model.get_input_embeddings().weight.device.type == "meta"
    assert_edits_match(resident, offload, family, erase="unk")


def assert_edits_match(resident, offload, family: str, erase: str) -> None:
    runners = [EditRunner(lm, precision="fp32") for lm in (resident, offload)]
    prompts, targets = cases(family)
    clean = [r.prober.probe(prompts, targets) for r in runners]
    assert_same_probes(clean[1], clean[0])

    for op, factor in FACTORS.items():  # suppress / amplify: activations scaled at the target position
        neurons = [SLOTS] * len(prompts)
        want, got = (r.prober.probe(prompts, targets, neurons=neurons, factor=factor) for r in runners)
        assert_same_probes(got, want)
        assert_changed(want, clean[0], op)

    old_id, new_id = resident.tokenizer.convert_tokens_to_ids(["paris", "rome"])
    edits = {"update": lambda lm: apply_update(lm, SLOTS, old_id, new_id, 1.0, 8.0),
             f"erase {erase}": lambda lm: apply_erase(lm, SLOTS, erase_value(lm, erase))}
    for name, edit in edits.items():
        after = []
        for runner in runners:
            with edited(runner.lm, SLOTS):
                edit(runner.lm)
                after.append(runner.prober.probe(prompts, targets))
        assert_same_probes(after[1], after[0])
        assert_changed(after[0], clean[0], name)
    for runner, before in zip(runners, clean):  # every edit undone exactly
        np.testing.assert_array_equal(_numbers(runner.prober.probe(prompts, targets))[0], _numbers(before)[0])
