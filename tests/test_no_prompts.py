"""Commands with no prompt to work on say so, why, and what to change (exit code 2), before
any cluster or model starts where they can; none ends in a traceback."""

from __future__ import annotations

import re
from importlib.resources import files
from pathlib import Path

import pytest

from kn_ray.interfaces.cli import main
from kn_ray.interfaces.commands.bench import corpus_text
from kn_ray.pipeline.facts import Fact, FactSet
from kn_ray.pipeline.prompts import build_prompts
from tests.pipeline_fixtures import save_tiny_model

DEMO_FACTS = str(files("kn_ray") / "data" / "demo_facts.jsonl")


@pytest.fixture
def empty_facts(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_text("\n")
    return path


def _error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return " ".join(err.split())


def test_attribute_and_run_with_no_facts_say_so_before_ray_starts(empty_facts, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["attribute", "--model", "smollm2", "--facts", str(empty_facts), "--output", str(out)]) == 2
    assert f"{empty_facts}: no facts, so no prompts: nothing to do" in _error(capsys) and not out.exists()
    spec = tmp_path / "job.yaml"
    spec.write_text(f"model: smollm2\nfacts: {empty_facts}\noutput: {out}\nfilters:\n  relations: [P17]\n")
    assert main(["run", str(spec)]) == 2
    assert "no facts of the relations P17, so no prompts" in _error(capsys) and not out.exists()


def test_a_causal_lm_without_usable_templates_has_no_prompts_and_says_why():
    facts = FactSet([Fact("f1", "P19", "Dante", "Florence", templates=("[Y] is where [X] was born .",))])
    built = build_prompts(facts, masked=False)
    with pytest.raises(ValueError, match=r"no prompts for gpt2: its one template puts \[Y\] before"):
        built.require("facts.jsonl", "gpt2")
    assert build_prompts(facts, masked=True).require("facts.jsonl", "bert").prompts


def test_bench_outside_the_token_window_names_the_window_and_the_prompt_lengths(tmp_path, capsys):
    """The presets' tokenizers (llama3.2-1b-random: 4 to 6 tokens) miss the default 8-15 window on
    the demo facts as this word-level one does; the message is the same."""
    model = save_tiny_model("gpt2", corpus_text(Path(DEMO_FACTS)), tmp_path / "gpt2")
    assert main(["bench", "--model", str(model), "--facts", DEMO_FACTS, "--device", "cpu"]) == 2
    error = _error(capsys)
    assert f"falls in the token window 8-15 of {model}'s tokenizer: its 18 candidate prompts are " in error
    suggested = re.search(r"Pass --tokens (\d+)-(\d+) \(all of them\)", error)
    listed = error.split("candidate prompts are ")[1].split(" tokens long")[0]  # '4 (x2), 5 (x6), 6 (x10)'
    lengths = [int(n) for n in re.findall(r"(\d+)(?: \(x\d+\))?", listed)]
    assert suggested and (int(suggested[1]), int(suggested[2])) == (min(lengths), max(lengths)) and max(lengths) < 8


def test_bench_without_facts_or_with_a_bad_window_says_so(empty_facts, capsys):
    assert main(["bench", "--facts", str(empty_facts)]) == 2
    assert "no facts, so no prompts" in _error(capsys)
    assert main(["bench", "--facts", DEMO_FACTS, "--tokens", "8to15"]) == 2
    assert "--tokens '8to15': expected LOW-HIGH" in _error(capsys)
