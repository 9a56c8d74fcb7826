"""Today's edit criteria from prompt rows: hand-made rows with known answers."""

from __future__ import annotations

import itertools

import numpy as np
import pandas as pd
import pytest

from kn_ray.stages.edit.criteria import (bootstrap_ci, criteria_rows, criteria_summary, criteria_text, flipped,
                                         reversed_prompt)

COUNTER = itertools.count()


def row(op, scope, before, after, top_before=1, top_after=1, fact="F1", condition="kn", rel=-0.5, new=None):
    return dict(op=op, relation="P190", fact_id=fact, prompt_id=f"{fact}-{scope}-{next(COUNTER)}",
                condition=condition, scope=scope, n_neurons=3, correct_before=before, correct_after=after,
                top_id_before=top_before, top_id_after=top_after, rel_change=rel, new_top1_after=new)


def test_reliability_counts_argmax_flips_the_way_each_op_intends():
    rows = pd.DataFrame([
        row("suppress", "target", True, False), row("suppress", "target", True, True),
        row("suppress", "target", False, False),  # wrong before: cannot flip away, not counted
        row("amplify", "target", False, True), row("amplify", "target", True, True),  # right before: not counted
        row("update", "target", True, False, new=True), row("update", "target", True, True, new=False),
        row("update", "reverse", True, False), row("update", "reverse", False, False),  # the reversed fact lost?
    ])
    np.testing.assert_array_equal(flipped(rows).to_numpy(), [1, 0, np.nan, 1, np.nan, 1, 0, 1, np.nan])
    got = criteria_rows(rows).set_index(["op", "metric"]).value
    assert got["suppress", "reliability"] == 0.5 and got["amplify", "reliability"] == 1.0
    assert got["update", "reliability"] == 0.5


def test_generalisation_locality_and_symmetry_come_from_their_scopes():
    rows = pd.DataFrame([
        row("suppress", "heldout", True, False), row("suppress", "heldout", True, False),
        row("suppress", "same_relation", True, True, 5, 5), row("suppress", "same_relation", True, False, 5, 7),
        row("suppress", "other_relation", False, False, 3, 3),
        row("suppress", "reverse", True, False, rel=-0.8), row("suppress", "reverse", False, False, rel=-0.2),
    ])
    got = criteria_rows(rows).set_index("metric").value
    assert got["generalization"] == 1.0
    assert got["locality_same_relation"] == 0.5 and got["locality_other_relation"] == 1.0
    assert got["symmetry"] == 1.0 and got["symmetry_rel_change"] == pytest.approx(-0.5)
    assert "reliability" not in got  # no target rows


def test_summary_means_over_edits_with_a_bootstrap_interval():
    rows = pd.DataFrame([row("suppress", "target", True, i % 3 == 0, fact=f"F{i}") for i in range(30)]
                        + [row("suppress", "target", True, True, fact=f"F{i}", condition="random") for i in range(30)])
    summary = criteria_summary(criteria_rows(rows)).set_index("condition")
    kn, rnd = summary.loc["kn"], summary.loc["random"]
    assert kn.n_edits == 30 and kn["mean"] == pytest.approx(20 / 30)
    assert kn.ci_low < kn["mean"] < kn.ci_high and kn.ci_high - kn.ci_low < 0.5
    assert rnd["mean"] == 0 and rnd.ci_low == rnd.ci_high == 0
    assert "reliability" in criteria_text(criteria_summary(criteria_rows(rows)))


def test_bootstrap_interval_covers_the_mean_and_narrows_with_more_facts():
    rng = np.random.default_rng(1)
    small, big = bootstrap_ci(rng.normal(0, 1, 20)), bootstrap_ci(rng.normal(0, 1, 2000))
    assert small[0] < 0 < small[1] or abs(np.mean(small)) < 0.6
    assert big[1] - big[0] < (small[1] - small[0]) / 4
    assert np.isnan(bootstrap_ci([np.nan])[0])


def test_reversed_prompt_swaps_subject_and_object_in_causal_templates():
    assert reversed_prompt("[X] is a twin city of [Y].", "Paris", "Rome") == ("Rome is a twin city of", " Paris")
    assert reversed_prompt("[Y] is a twin city of [X].", "Paris", "Rome") is None  # object not at the end
    assert reversed_prompt(None, "Paris", "Rome") is None
    assert reversed_prompt("[Y] is a twin city of [X].", "paris", "rome", masked=True) == \
        ("[MASK] is a twin city of rome.", "paris")  # masked LMs: every template, object masked
