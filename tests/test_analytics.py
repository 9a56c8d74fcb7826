"""Analytics frames: documented columns, hand-built numbers, brute-force overlap on synthetic data."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from kn_ray.stages.aggregate import aggregate
from kn_ray.stages.report.analytics import ALL, COLUMNS, Analytics
from tests.synthetic import SyntheticSpec, write_synthetic_edits, write_synthetic_run, write_tables

KN_SETS = {"A": ("R1", {1, 2, 3}), "B": ("R1", {2, 3, 4}), "C": ("R2", {3, 5}), "D": ("R2", {6}), "E": ("R1", set())}


@pytest.fixture
def hand_built(tmp_path):
    prompts = [{"prompt_id": f"{f}/{k}", "fact_id": f, "relation": r, "status": "ok", "seconds": 0.5, "gold_prob": 0.5}
               for f, (r, _) in KN_SETS.items() for k in range(3)]
    prompts += [{"prompt_id": "E/9", "fact_id": "E", "relation": "R1", "status": "skipped", "error": "too long",
                 "seconds": 0.0},
                {"prompt_id": "F/0", "fact_id": "F", "relation": "R2", "status": "error", "error": None, "seconds": 1.0}]
    kn = [{"fact_id": f, "relation": r, "layer": n % 3, "neuron": n, "n_prompts": 3, "share": 1.0, "mean_score": 1.0,
           "method": "ig"} for f, (r, neurons) in KN_SETS.items() for n in neurons]
    edits = [{"op": "suppress", "relation": r, "fact_id": f, "prompt_id": f"{f}/0", "condition": "kn",
              "prob_before": 0.5, "prob_after": 0.5 * (1 + c), "rel_change": c}
             for r, f, c in [("R1", "A", -0.5), ("R1", "B", -0.3), ("R2", "C", -0.1)]]
    edits += [{"op": "erase", "relation": "R1", "fact_id": "A", "condition": "kn", "metric": "success_rate", "value": v}
              for v in (0.2, 0.4)]
    return write_tables(tmp_path, {"identity": {"model": "tiny-lm"}}, prompts=pd.DataFrame(prompts),
                        knowledge_neurons=pd.DataFrame(kn), edits=pd.DataFrame(edits))


def test_overlap_hand_built(hand_built):
    frame = Analytics(hand_built).overlap().set_index("pairs")
    # intra: (A,B) share {2,3}, J = 2/4; (C,D) nothing. inter: A-C, B-C share {3}, J = 1/4; A-D, B-D nothing
    assert frame.loc["intra", ["n_facts", "n_pairs", "mean_shared", "mean_jaccard"]].tolist() == [4, 2, 1.0, 0.25]
    assert frame.loc["inter", ["n_pairs", "mean_shared", "mean_jaccard"]].tolist() == [4, 0.5, 0.125]


def test_counts_hand_built(hand_built):
    a = Analytics(hand_built)
    layers = a.layer_histogram()
    assert layers.layer.tolist() == [0, 1, 2] and layers.n_neurons.sum() == 9 and layers.share.sum() == pytest.approx(1)
    per_fact = a.neurons_per_fact().set_index("fact_id").n_neurons.to_dict()
    assert per_fact == {"A": 3, "B": 3, "C": 2, "D": 1, "E": 0}  # F has no usable prompt
    stats = a.run_stats().set_index("relation")
    assert stats.loc[ALL, ["facts", "prompts", "ok", "skipped", "error"]].tolist() == [6, 17, 15, 1, 1]
    assert stats.loc[ALL, "ok_per_compute_second"] == pytest.approx(15 / 8.5)
    assert stats.loc["R2", "error"] == 1
    reasons = a.skip_reasons()
    assert set(zip(reasons.status, reasons.reason, reasons.n_prompts)) == {("skipped", "too long", 1),
                                                                          ("error", "(no reason given)", 1)}


def test_edit_frames_hand_built(hand_built):
    a = Analytics(hand_built)
    summary = a.edit_summary().set_index("relation")
    assert summary.loc[ALL, "n"] == 3 and summary.loc[ALL, "mean_rel_change"] == pytest.approx(-0.3)
    assert summary.loc["R1", "mean_rel_change"] == pytest.approx(-0.4)
    metrics = a.edit_metrics()
    assert metrics[["op", "relation", "metric", "n_edits"]].values.tolist() == [["erase", ALL, "success_rate", 2],
                                                                                ["erase", "R1", "success_rate", 2]]
    assert metrics["mean"].tolist() == pytest.approx([0.3, 0.3])


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_run(out, SyntheticSpec(facts=240, relations=4, seed=5))
    aggregate(out)
    return out


def test_documented_columns(synthetic):
    a = Analytics(synthetic)
    for name in ["layer_histogram", "neurons_per_fact", "overlap", "run_stats", "skip_reasons"]:
        frame = getattr(a, name)()
        assert list(frame.columns) == COLUMNS[name] and len(frame), name
    for name in ["edit_summary", "edit_metrics"]:  # no edits/ yet: empty, same columns
        frame = getattr(a, name)()
        assert list(frame.columns) == COLUMNS[name] and frame.empty
    write_synthetic_edits(synthetic, facts=30)
    assert not a.edit_summary().empty and list(a.edit_metrics().columns) == COLUMNS["edit_metrics"]


def brute_force_overlap(out) -> dict:
    """{(method, kind): (pairs, mean shared, mean Jaccard)} over every pair of facts with a knowledge neuron."""
    kn = pq.read_table(out / "knowledge_neurons").to_pandas()
    result = {}
    for method, frame in kn.groupby("method"):
        sets = {f: (g.relation.iloc[0], set(zip(g.layer, g.neuron))) for f, g in frame.groupby("fact_id")}
        pairs = {"intra": [], "inter": []}
        for (r1, s1), (r2, s2) in itertools.combinations(sets.values(), 2):
            pairs["intra" if r1 == r2 else "inter"].append((len(s1 & s2), len(s1 & s2) / len(s1 | s2)))
        for kind, values in pairs.items():
            result[(method, kind)] = (len(values), *np.mean(values, axis=0))
    return result


def test_overlap_equals_brute_force(synthetic):
    got = Analytics(synthetic).overlap().set_index(["method", "pairs"])
    for key, (n_pairs, shared, jaccard) in brute_force_overlap(synthetic).items():
        row = got.loc[key]
        assert row.n_pairs == row.jaccard_pairs == n_pairs
        assert row.mean_shared == pytest.approx(shared) and row.mean_jaccard == pytest.approx(jaccard)


def test_overlap_sampled_beyond_max_pairs(synthetic):
    got = Analytics(synthetic).overlap(max_pairs=4000, seed=1).set_index(["method", "pairs"])
    for key, (n_pairs, shared, jaccard) in brute_force_overlap(synthetic).items():
        row = got.loc[key]
        assert row.n_pairs == n_pairs and row.jaccard_pairs == 4000
        assert row.mean_shared == pytest.approx(shared)  # exact from counts at any size
        assert row.mean_jaccard == pytest.approx(jaccard, abs=0.01)


def test_neuron_views_need_aggregate(tmp_path):
    write_synthetic_run(tmp_path, SyntheticSpec(facts=10))
    with pytest.raises(FileNotFoundError, match="kn-ray aggregate"):
        Analytics(tmp_path).layer_histogram()


def test_edit_summaries_equal_a_pandas_reference(synthetic):
    """The one summary of the edits table (edit stage and report alike) against plain pandas."""
    write_synthetic_edits(synthetic, facts=30)
    rows = pq.read_table(synthetic / "edits").to_pandas()
    a = Analytics(synthetic)
    scale = rows[rows.op.isin(["suppress", "amplify"]) & rows.rel_change.notna()]
    scale = pd.concat([scale, scale.assign(relation=ALL)])
    expected = scale.groupby(["op", "condition", "relation"]).agg(
        n=("rel_change", "size"), mean_rel_change=("rel_change", "mean"), median_rel_change=("rel_change", "median"),
        mean_prob_before=("prob_before", "mean"), mean_prob_after=("prob_after", "mean")).reset_index()
    prompts = rows[rows.op.isin(["suppress", "amplify"]) & rows.prompt_id.notna()]  # the predictions: every prompt
    prompts = pd.concat([prompts, prompts.assign(relation=ALL)])
    known, after = prompts.correct_before.astype(bool), prompts.correct_after.astype(bool)
    rates = prompts.assign(known=known, flip=(~after).where(known).astype(float),
                           gain=after.where(~known).astype(float), gain_all=(after & ~known).astype(float))
    rates = rates.groupby(["op", "condition", "relation"]).agg(
        n_prompts=("known", "size"), n_known=("known", "sum"), flip_rate=("flip", "mean"), gain_rate=("gain", "mean"),
        gain_rate_all=("gain_all", "mean")).reset_index()
    expected = expected.merge(rates, on=["op", "condition", "relation"])
    got = a.edit_summary().sort_values(["op", "condition", "relation"], ignore_index=True)
    assert 0 < got.n_known.sum() < got.n_prompts.sum()  # both kinds of prompt occur
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    metrics = rows[rows.metric.notna()]
    metrics = pd.concat([metrics, metrics.assign(relation=ALL)])
    expected = metrics.groupby(["op", "condition", "relation", "metric"]).value.agg(["count", "mean"]).reset_index()
    got = a.edit_metrics().sort_values(["op", "condition", "relation", "metric"], ignore_index=True)
    assert {"success_rate", "change_rate", "target_accuracy_after"} <= set(got.metric)
    pd.testing.assert_frame_equal(got, expected.rename(columns={"count": "n_edits"}), check_dtype=False)
