"""Edits judged by predictions (docs/experiments.md): flip / gain rates of suppress and amplify,
destructive update / erase edits, and no interval over too few units. Hand-made probes go
through the edit stage's own row builders; every expected number is counted by hand here."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pandas as pd
import pytest

from kn_ray.engine.probe import Probe
from kn_ray.stages.duck import connect
from kn_ray.stages.edit.corpus import FactItem, PromptRef
from kn_ray.stages.edit.criteria import bootstrap_ci, criteria_summary, criteria_text
from kn_ray.stages.edit.experiments import _update_rows
from kn_ray.stages.edit.outcomes import (ALL, SCALE_COLUMNS, as_table, edit_metric_rows, metric_summary, prompt_row,
                                         scale_summary, summary_dict)
from kn_ray.stages.report import paper

GOLD, OTHER, NEW = 0, 1, 7  # token ids: the gold object's first token, another token, the new object's


def probe(p: float, top: int, first: int = GOLD) -> Probe:
    """A one-token target with P = p (perplexity 1 / p) whose argmax is `top`."""
    return Probe("", "", gold_prob=p, n_target_tokens=1, top_id=top, first_target_id=first)


def refs(fact: str, scope: str, n: int) -> list[PromptRef]:
    return [PromptRef(f"{fact}:{scope}:{i}", "prompt", " gold") for i in range(n)]


def update_edit(fact: str, collateral_factor: float, condition: str = "kn") -> list[dict]:
    """One update edit that succeeds on its 2 target prompts (the gold was top-1 before, the new
    object is top-1 after) and multiplies the perplexity of its 2 same-relation and 3
    other-relation prompts by `collateral_factor` (their argmax does not move)."""
    item = FactItem(fact, "P36", refs(fact, "target", 2), [(1, 2)], same_relation=refs(fact, "same", 2),
                    other_relation=refs(fact, "other", 3))
    collateral = item.same_relation + item.other_relation
    all_refs = item.prompts + collateral
    scopes = ["target"] * 2 + ["same_relation"] * 2 + ["other_relation"] * 3
    p_collateral = [0.5, 0.2, 0.4, 0.1, 0.25]
    before = ([probe(0.6, GOLD)] * 2 + [probe(p, GOLD) for p in p_collateral]
              + [probe(0.01, GOLD, first=NEW)] * 2)  # then the new target on the fact's prompts
    after = ([probe(0.05, NEW)] * 2 + [probe(p / collateral_factor, GOLD) for p in p_collateral]
             + [probe(0.7, NEW, first=NEW)] * 2)
    return _update_rows(item, condition, 1, "rome", all_refs, scopes, before, after)


def per_edit(metrics: pd.DataFrame) -> pd.Series:
    return metrics.set_index(["fact_id", "metric"]).value


# ---- destructive edits --------------------------------------------------------------------------
def test_an_update_that_breaks_unrelated_prompts_is_destructive_and_not_a_success():
    rows = pd.DataFrame(update_edit("broken", 100.0) + update_edit("clean", 2.0) + update_edit("edge", 10.0))
    got = per_edit(edit_metric_rows(rows, 10.0))
    # corpus perplexity exp(mean log ppl): every prompt's ppl grew by the same factor, so the ratio is that factor
    assert got["broken", "collateral_ppl_ratio"] == pytest.approx(100.0)
    assert got["clean", "collateral_ppl_ratio"] == pytest.approx(2.0)
    assert got["broken", "destructive"] == 1.0 and got["clean", "destructive"] == 0.0
    assert got["edge", "destructive"] == 0.0  # "more than" the bound: x10 itself is not destructive
    for fact in ("broken", "clean", "edge"):  # every edit flipped both prompts to the new object
        assert got[fact, "success_rate_raw"] == 1.0 and got[fact, "reliability_raw"] == 1.0
        assert got[fact, "change_rate_raw"] == 1.0 and got[fact, "success_rate_all_raw"] == 1.0
    for metric in ("success_rate", "success_rate_all", "change_rate", "reliability"):
        assert got["broken", metric] == 0.0  # destructive: a failure, whatever the target prompts say
        assert got["clean", metric] == 1.0 and got["edge", metric] == 1.0
    assert got["broken", "locality_other_relation"] == 1.0  # the argmax stayed: locality alone would not see it
    looser = per_edit(edit_metric_rows(rows, 1000.0))
    assert looser["broken", "destructive"] == 0.0 and looser["broken", "success_rate"] == 1.0

    metrics = edit_metric_rows(rows, 10.0)
    with connect() as con:
        con.register("edits", as_table(pd.concat([rows, metrics], ignore_index=True)))
        summary = metric_summary(con, "edits")
    out = summary_dict(pd.DataFrame(columns=SCALE_COLUMNS), summary)["update"]["kn"]
    overall = out[ALL]
    assert overall["n_destructive"] == 1 and overall["n_judged"] == 3
    assert overall["success_rate"] == pytest.approx(2 / 3) and overall["success_rate_raw"] == pytest.approx(1.0)
    assert out["P36"]["destructive"] == pytest.approx(1 / 3) and out["P36"]["collateral_ppl_ratio"] == pytest.approx(112 / 3)
    flags = criteria_summary(metrics).set_index("metric")
    assert flags.loc["destructive", "mean"] == pytest.approx(1 / 3) and flags.loc["reliability", "mean"] == pytest.approx(2 / 3)


def test_an_erase_that_breaks_other_relations_is_destructive():
    rows = []
    for relation, factor in (("P36", 50.0), ("P37", 3.0)):
        for i in range(4):  # the relation's prompts: right before, wrong after
            rows.append(prompt_row("erase", relation, None, "kn", "target", 20, f"{relation}:t{i}",
                                   probe(0.5, GOLD), probe(0.1, OTHER)))
        for i, p in enumerate((0.5, 0.05)):  # other relations' prompts: perplexity x factor
            rows.append(prompt_row("erase", relation, None, "kn", "other_relation", 20, f"{relation}:o{i}",
                                   probe(p, GOLD), probe(p / factor, GOLD)))
    got = edit_metric_rows(pd.DataFrame(rows), 10.0).set_index(["relation", "metric"]).value
    assert got["P36", "collateral_ppl_ratio"] == pytest.approx(50.0) and got["P36", "destructive"] == 1.0
    assert got["P37", "collateral_ppl_ratio"] == pytest.approx(3.0) and got["P37", "destructive"] == 0.0
    assert got["P36", "reliability"] == 0.0 and got["P36", "reliability_raw"] == 1.0
    assert got["P37", "reliability"] == 1.0


def test_an_edit_without_collateral_prompts_is_not_judged():
    rows = pd.DataFrame([r for r in update_edit("alone", 100.0) if r["scope"] == "target"])
    got = per_edit(edit_metric_rows(rows, 10.0))
    assert ("alone", "destructive") not in got and got["alone", "success_rate"] == 1.0


# ---- flip and gain rates ----------------------------------------------------------------------------
def test_flip_and_gain_rates_equal_a_hand_count():
    rng = np.random.default_rng(4)
    rows, facts = [], [(f"F{i}", "P36" if i < 4 else "P37") for i in range(7)]
    for op, condition, (fact, relation) in itertools.product(("suppress", "amplify"),
                                                             ("kn", "random", "other_relation"), facts):
        scope = "other_relation" if condition == "other_relation" else "target"
        for j in range(int(rng.integers(1, 5))):
            before, after = bool(rng.random() < 0.4), bool(rng.random() < 0.5)
            p = 0.0 if j == 3 else float(rng.uniform(0.01, 0.9))  # P = 0: no relative change, still a prediction
            rows.append(prompt_row(op, relation, fact, condition, scope, 3, f"{op}:{condition}:{fact}:{j}",
                                   probe(p, GOLD if before else OTHER), probe(p / 2, GOLD if after else OTHER)))
    rows.append(prompt_row("suppress", "P36", "F0", "kn", "same_relation", 3, "criteria-only",  # not a paper row
                           probe(0.5, GOLD), probe(0.5, OTHER)))
    with connect() as con:
        con.register("edits", as_table(pd.DataFrame(rows)))
        got = scale_summary(con, "edits").set_index(["op", "condition", "relation"])
    counted = 0
    for op, condition in itertools.product(("suppress", "amplify"), ("kn", "random", "other_relation")):
        for relation in ("P36", "P37", ALL):
            mine = [r for r in rows if r["op"] == op and r["condition"] == condition and r["prompt_id"] != "criteria-only"
                    and (relation == ALL or r["relation"] == relation)]
            known = [r for r in mine if r["correct_before"]]
            unknown = [r for r in mine if not r["correct_before"]]
            flips = sum(1 for r in known if not r["correct_after"])
            gains = sum(1 for r in unknown if r["correct_after"])
            cell = got.loc[(op, condition, relation)]
            assert cell.n_prompts == len(mine) and cell.n_known == len(known)
            assert cell.n == sum(1 for r in mine if not math.isnan(r["rel_change"]))
            assert cell.flip_rate == pytest.approx(flips / len(known)) if known else pd.isna(cell.flip_rate)
            assert cell.gain_rate == pytest.approx(gains / len(unknown)) if unknown else pd.isna(cell.gain_rate)
            assert cell.gain_rate_all == pytest.approx(gains / len(mine))
            counted += 1
    assert counted == 18 and (got.n < got.n_prompts).any()  # some prompts had P = 0
    # the paper's table pools the same prompts (intervals over facts)
    frame = pd.DataFrame(rows)
    table = {r["key"]: r for r in paper._scale_rows(frame)}
    assert table["suppress_kn_flip"]["value"] == pytest.approx(got.loc[("suppress", "kn", ALL)].flip_rate)
    assert table["amplify_random_gain"]["value"] == pytest.approx(got.loc[("amplify", "random", ALL)].gain_rate)
    assert table["amplify_kn_gain_all"]["value"] == pytest.approx(got.loc[("amplify", "kn", ALL)].gain_rate_all)
    assert table["suppress_other_flip"]["value"] == pytest.approx(got.loc[("suppress", "other_relation", ALL)].flip_rate)


# ---- too few units for an interval ------------------------------------------------------------------
def test_an_interval_over_fewer_than_five_units_is_marked_too_few():
    assert all(math.isnan(v) for v in bootstrap_ci([1.0, 1.0]) + bootstrap_ci([0.2, 0.4, 0.6, 0.8]))
    low, high = bootstrap_ci([0.0, 1.0, 0.0, 1.0, 1.0])
    assert 0 <= low < 0.6 < high <= 1
    metrics = pd.DataFrame([dict(op="erase", relation=f"R{i}", fact_id=None, condition=c, n_neurons=3,
                                 metric="reliability", value=float(i % 2))
                            for c, n in (("kn", 4), ("random", 5)) for i in range(n)])
    summary = criteria_summary(metrics).set_index("condition")
    few, enough = summary.loc["kn"], summary.loc["random"]
    assert few.too_few and few.n_edits == 4 and math.isnan(few.ci_low) and math.isnan(few.ci_high)
    assert few["mean"] == pytest.approx(0.5)  # the mean is still given
    assert not enough.too_few and enough.ci_low < enough["mean"] < enough.ci_high
    text = criteria_text(criteria_summary(metrics))
    assert "0.50 (n=4, too few for an interval)" in text and "[" in text.split("random")[1]
    two, five = paper._row("update_success", [1.0, 1.0]), paper._row("update_success", [0, 1, 0, 1, 1.0])
    assert two["too_few"] and math.isnan(two["ci_low"]) and not five["too_few"] and five["ci_low"] < five["ci_high"]
    assert paper._cell(two, "update_success", "pct") == "100.0% (n=2, too few for an interval)"
    assert paper._cell(five, "update_success", "pct").startswith("60.0% [")
