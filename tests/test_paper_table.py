"""The paper's table: pair statistics against a brute-force count, and `kn-ray report A B`."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from kn_ray.interfaces.cli import main as cli
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.stages.report.paper import PAPER_BERT, pair_stats
from tests.synthetic import SyntheticSpec, write_synthetic_edits, write_synthetic_run


def test_pair_stats_equal_a_brute_force_count():
    rng = np.random.default_rng(3)
    rows = [(f"f{i}", f"r{i % 3}", int(layer), int(neuron))
            for i in range(12) for layer, neuron in {(int(rng.integers(0, 3)), int(rng.integers(0, 6)))
                                                     for _ in range(int(rng.integers(1, 6)))}]
    kn = pd.DataFrame(rows, columns=["fact_id", "relation", "layer", "neuron"])
    sets = {f: set(zip(g.layer, g.neuron)) for f, g in kn.groupby("fact_id")}
    relation = dict(zip(kn.fact_id, kn.relation))
    want = {"intra": ([], []), "inter": ([], [])}
    for a, b in itertools.combinations(sorted(sets), 2):
        kind = "intra" if relation[a] == relation[b] else "inter"
        shared = len(sets[a] & sets[b])
        want[kind][0].append(shared)
        want[kind][1].append(shared / len(sets[a] | sets[b]))
    got = {row["key"]: row for row in pair_stats(kn, n_boot=200)}
    for kind in ("intra", "inter"):
        assert got[f"shared_{kind}"]["value"] == pytest.approx(np.mean(want[kind][0]))
        assert got[f"jaccard_{kind}"]["value"] == pytest.approx(np.mean(want[kind][1]))
        for key in (f"shared_{kind}", f"jaccard_{kind}"):
            assert got[key]["ci_low"] <= got[key]["value"] <= got[key]["ci_high"]


def test_report_of_two_runs_puts_them_side_by_side(tmp_path, capsys):
    runs = []
    for name, seed in (("model_a", 1), ("model_b", 2)):
        out = tmp_path / name
        write_synthetic_run(out, SyntheticSpec(facts=30, relations=3, seed=seed))
        aggregate(out, AggregateParams())
        write_synthetic_edits(out, facts=10)
        runs.append(str(out))
    table = tmp_path / "table.md"
    assert cli(["report", *runs, "--table", str(table)]) == 0
    text = table.read_text()
    assert text in capsys.readouterr().out
    header, _, *rows = text.splitlines()
    assert header == "| | model_a | model_b | paper (BERT-base) |"
    per_fact = next(r for r in rows if r.startswith("| knowledge neurons per fact |"))
    cells = [c.strip() for c in per_fact.strip("|").split("|")]
    assert cells[3] == f"{PAPER_BERT['kn_per_fact']:.2f}" and all("[" in c for c in cells[1:3])  # mean [95% CI]
    assert any(r.startswith("| suppress (x0): knowledge neurons |") for r in rows)
    for run in runs:
        assert "The paper&#x27;s table" in (tmp_path / run / "report" / "index.html").read_text()
