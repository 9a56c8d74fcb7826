"""The edit experiments (kn-ray edit): formulas on hand-made examples, edits that undo exactly,
controls that are seeded, the edits table contract, the CLI and saved edited models."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from kn_ray.engine import LoadedModel, Prober, load_model
from kn_ray.engine.editing import add_to_value_slots, edited, value_slot, word_embedding
from kn_ray.interfaces.cli import build_parser, main
from kn_ray.interfaces.commands.attribute import spec_from_args
from kn_ray.interfaces.jobs import options_from_spec
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.placement import Placement
from kn_ray.stages.edit.corpus import EditCorpus, rng_for
from kn_ray.stages.edit.options import EditOptions, EditSettings
from kn_ray.stages.edit.experiments import (EditRunner, apply_erase, apply_update, erase_value, random_neurons,
                                       update_delta)
from kn_ray.stages.edit.stage import save_edit
from kn_ray.stages.edit.outcomes import EDITS, as_table, corpus_ppl, metric_rows, relative_change
from tests.pipeline_fixtures import save_tiny_model
from tests.synthetic import write_tables
from tests.numerics import assert_same_edit_rows, assert_same_numbers
from tests.tiny_models import tiny_model

FACTS = {  # relation -> (template, [(subject, object)])
    "P36": ("the capital of [X] is", [("france", "paris"), ("germany", "berlin"), ("italy", "rome"),
                                      ("spain", "madrid")]),
    "P37": ("the official language of [X] is", [("france", "french"), ("germany", "german"),
                                                ("london", "english")]),
}
TEMPLATES = ("{}", "in short , {}")  # two prompts per fact


def _prompts() -> pd.DataFrame:
    rows = []
    for relation, (template, pairs) in FACTS.items():
        for subject, obj in pairs:
            fact_id = f"{relation}-{subject}"
            for i, wrap in enumerate(TEMPLATES):
                rows.append(dict(prompt_id=f"{fact_id}-{i}", fact_id=fact_id, relation=relation, subject=subject,
                                 object=obj, template=template, prompt=wrap.format(template.replace("[X]", subject)),
                                 target=" " + obj, status="ok"))
    rows.append(dict(prompt_id="bad", fact_id="P36-france", relation="P36", subject="france", object="paris",
                     prompt="", target=" paris", status="error", error="bad record"))
    return pd.DataFrame(rows)


def _neurons(prompts: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Two or three ig neurons per fact (one of them P36's relation neuron 2:5) and one activation neuron."""
    kn, facts = [], prompts[prompts.status == "ok"].drop_duplicates("fact_id")
    for i, f in enumerate(facts.itertuples()):
        ig = [(1, 3 * i + 1), (2, 3 * i + 2)] + ([(2, 5)] if f.relation == "P36" else [])
        kn += [dict(fact_id=f.fact_id, relation=f.relation, layer=l, neuron=n, method="ig") for l, n in ig]
        kn.append(dict(fact_id=f.fact_id, relation=f.relation, layer=0, neuron=40 - i, method="activation"))
    rn = pd.DataFrame([dict(relation="P36", layer=2, neuron=5, n_facts=4, share=1.0, method="ig"),
                       dict(relation="P36", layer=1, neuron=1, n_facts=1, share=0.25, method="ig"),
                       dict(relation="P37", layer=1, neuron=13, n_facts=1, share=0.33, method="ig")])
    return pd.DataFrame(kn), rn


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A hand-built aggregated run over a tiny saved gpt2 whose vocabulary covers the prompts."""
    root = tmp_path_factory.mktemp("edit")
    prompts = _prompts()
    model_dir = save_tiny_model("gpt2", list(prompts.prompt) + list(prompts.target), root / "model")
    kn, rn = _neurons(prompts)
    out = write_tables(root / "out", {"identity": {"model": str(model_dir)}, "options": {"placement": {"precision": "fp32"}}},
                       prompts=prompts, knowledge_neurons=kn, relation_neurons=rn)
    return out


@pytest.fixture(scope="module")
def runner(run_dir):
    return EditRunner(load_model(str(run_dir.parent / "model"), device="cpu"), precision="fp32")


def _edits(run_dir):
    return pq.read_table(sorted(str(p) for p in (run_dir / "edits").glob("part-*.parquet")))


def _units(run_dir, op, **settings):
    return EditCorpus(run_dir).units(op, EditSettings(**settings))


# ---- formulas on hand-made examples ------------------------------------------------------------
def test_relative_change_formula():
    out = relative_change([0.5, 0.2, 0.0], [0.25, 0.3, 0.1])
    assert out[:2] == pytest.approx([-0.5, 0.5])
    assert np.isnan(out[2])  # undefined without a positive "before"


def test_update_delta_scales_embeddings_to_the_slot_norm():
    slots = torch.tensor([[3.0, 4.0], [0.0, 1.0]])  # norms 5 and 1
    e_old, e_new = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 10.0])
    delta = update_delta(slots, e_old, e_new, lambda1=1.0, lambda2=8.0)
    # |v| * (8 * e_new/|e_new| - 1 * e_old/|e_old|) = |v| * [-1, 8]
    assert torch.allclose(delta, torch.tensor([[-5.0, 40.0], [-1.0, 8.0]]))


def test_apply_update_on_a_hand_made_slot_and_its_inverse(runner):
    lm, slots = runner.lm, [(1, 7), (2, 11)]
    original = torch.stack([value_slot(lm, l, n).clone() for l, n in slots])
    e_old, e_new = word_embedding(lm, [5]), word_embedding(lm, [6])
    with edited(lm, slots):
        apply_update(lm, slots, 5, 6, 1.0, 8.0)
        norms = original.norm(dim=1, keepdim=True)
        expected = original + norms * (8 * e_new / e_new.norm() - e_old / e_old.norm())
        assert_same_numbers(torch.stack([value_slot(lm, l, n) for l, n in slots]), expected, what="updated slots")
        add_to_value_slots(lm, slots, -update_delta(original, e_old, e_new, 1.0, 8.0))  # the inverse edit
        assert_same_numbers(torch.stack([value_slot(lm, l, n) for l, n in slots]), original, what="reverted slots")
    assert torch.equal(torch.stack([value_slot(lm, l, n) for l, n in slots]), original)  # edited(): exact


def test_erase_sets_slots_to_zero_or_the_unknown_embedding(runner):
    lm, slots = runner.lm, [(0, 3), (2, 9)]
    before = {s: value_slot(lm, *s).clone() for s in slots}
    with edited(lm, slots):
        apply_erase(lm, slots, erase_value(lm, "zero"))
        assert all(torch.count_nonzero(value_slot(lm, *s)) == 0 for s in slots)
        apply_erase(lm, slots, erase_value(lm, "unk"))
        unk = lm.model.get_input_embeddings().weight[lm.tokenizer.unk_token_id]
        assert all(torch.equal(value_slot(lm, *s), unk) for s in slots)
    assert all(torch.equal(value_slot(lm, *s), before[s]) for s in slots)


def test_erase_unk_needs_an_unknown_token(tmp_path):
    model, tok = tiny_model("gpt2", tmp_path)
    tok.unk_token = None
    with pytest.raises(ValueError, match="no unknown token"):
        erase_value(LoadedModel.from_objects(model, tok), "unk")


def test_perplexity_aggregates_as_exp_mean_log():
    assert corpus_ppl(pd.Series([2.0, 8.0])) == pytest.approx(4.0)


def test_metric_rows_on_hand_built_update_rows():
    base = dict(op="update", relation="R", fact_id="f", condition="kn", n_neurons=2)
    rows = pd.DataFrame([
        dict(base, scope="target", correct_before=True, correct_after=False, new_top1_after=True, ppl_before=2.0, ppl_after=8.0),
        dict(base, scope="target", correct_before=True, correct_after=True, new_top1_after=False, ppl_before=2.0, ppl_after=2.0),
        dict(base, scope="target", correct_before=False, correct_after=False, new_top1_after=True, ppl_before=4.0, ppl_after=4.0),
        dict(base, scope="same_relation", correct_before=True, correct_after=True, ppl_before=3.0, ppl_after=12.0),
    ])
    metrics = metric_rows(rows).set_index("metric").value
    assert metrics["success_rate"] == pytest.approx(0.5)  # of the two prompts right before the edit
    assert metrics["change_rate"] == pytest.approx(0.5)
    assert metrics["success_rate_all"] == pytest.approx(2 / 3)
    assert metrics["target_accuracy_before"] == pytest.approx(2 / 3)
    assert metrics["target_ppl_after"] == pytest.approx((8 * 2 * 4) ** (1 / 3))
    assert metrics["same_relation_ppl_after"] == pytest.approx(12.0)


# ---- controls and units ------------------------------------------------------------------------
def test_random_neurons_are_seeded_with_the_same_layers_and_count():
    kn = [(1, 4), (1, 9), (2, 0)]
    a = random_neurons(kn, 48, rng_for(0, "fact"))
    assert a == random_neurons(kn, 48, rng_for(0, "fact"))
    assert a != random_neurons(kn, 48, rng_for(1, "fact"))
    assert sorted(l for l, _ in a) == [1, 1, 2]
    assert not set(a) & set(kn) and len(set(a)) == 3


def test_units_do_not_depend_on_grouping(run_dir):
    settings = EditSettings(control_prompts=3)
    small = [item for unit in EditCorpus(run_dir).units("suppress", settings, unit_facts=2) for item in unit.items]
    big = [item for unit in EditCorpus(run_dir).units("suppress", settings, unit_facts=99) for item in unit.items]
    assert small == big and len(big) == 7
    for item in big:
        assert len(item.controls) == 3 and all(not c.prompt_id.startswith(item.relation) for c in item.controls)
        assert "bad" not in [p.prompt_id for p in item.prompts]


def test_update_units_leave_out_shared_neurons_and_pick_another_object(run_dir):
    items = [i for u in _units(run_dir, "update") for i in u.items]
    france = next(i for i in items if i.fact_id == "P36-france")
    assert (2, 5) not in france.kn and france.kn
    assert "paris" not in france.new_objects and set(france.new_objects) <= {"berlin", "rome", "madrid"}
    assert all(r.prompt_id.startswith("P36") and not r.prompt_id.startswith("P36-france") for r in france.same_relation)
    assert all(r.prompt_id.startswith("P37") for r in france.other_relation)
    kept = [i for u in _units(run_dir, "update", shared_share=None) for i in u.items]
    assert (2, 5) in next(i for i in kept if i.fact_id == "P36-france").kn


def test_erase_units_take_the_top_relation_neurons(run_dir):
    items = [i for u in _units(run_dir, "erase", erase_top=1) for i in u.items]
    assert [(i.relation, i.neurons) for i in items] == [("P36", [(2, 5)]), ("P37", [(1, 13)])]
    assert len(items[0].prompts) == 8 and all(r.prompt_id.startswith("P37") for r in items[0].other_relation)


# ---- experiments ------------------------------------------------------------------------------
@pytest.mark.numerics
def test_suppress_equals_a_manual_prober_call(run_dir, runner):
    unit = _units(run_dir, "suppress")[0]
    rows = runner.run(unit)
    item = unit.items[0]
    prober = Prober(runner.lm, precision="fp32")
    prompts, targets = [p.prompt for p in item.prompts], [p.target for p in item.prompts]
    before = prober.probe(prompts, targets)
    after = prober.probe(prompts, targets, neurons=[item.kn] * len(prompts), factor=0.0)
    got = rows[(rows.fact_id == item.fact_id) & (rows.condition == "kn")].set_index("prompt_id")
    for ref, b, a in zip(item.prompts, before, after):
        assert_same_numbers(got.prob_before[ref.prompt_id], b.gold_prob, what="prob_before")  # other batch shapes
        assert_same_numbers(got.prob_after[ref.prompt_id], a.gold_prob, what="prob_after")
        assert_same_numbers(got.rel_change[ref.prompt_id], (a.gold_prob - b.gold_prob) / b.gold_prob, scale=1.0,
                            what="rel_change")
    assert set(rows.condition) == {"kn", "activation", "random", "other_relation"}
    counts = rows.groupby(["fact_id", "condition"]).n_neurons.first().unstack()
    assert (counts.random == counts.kn).all() and (counts.other_relation == counts.kn).all()


def test_update_and_erase_leave_the_weights_as_they_were(run_dir, runner):
    weights = {k: v.clone() for k, v in runner.lm.model.state_dict().items()}
    update = runner.run(_units(run_dir, "update")[0])
    erase = runner.run(_units(run_dir, "erase")[0])
    assert all(torch.equal(v, weights[k]) for k, v in runner.lm.model.state_dict().items())
    assert set(update.scope.dropna()) == {"target", "same_relation", "other_relation"}
    assert update[update.scope == "target"].new_prob_after.notna().all()
    assert {"success_rate", "change_rate", "same_relation_ppl_after"} <= set(update.metric.dropna())
    assert set(erase.condition.dropna()) == {"kn", "random"} and erase.fact_id.isna().all()


# ---- the stage, the table, the CLI -------------------------------------------------------------
def test_cli_writes_the_documented_edits_table(run_dir, capsys):
    assert main(["edit", str(run_dir), "--op", "suppress,amplify", "--op", "update", "--op", "erase",
                 "--max-facts", "2", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "suppress: mean relative change" in printed and "ALL" in printed
    table = _edits(run_dir)
    assert table.schema.equals(EDITS)
    edits = table.to_pandas()
    assert set(edits.op) == {"suppress", "amplify", "update", "erase"}
    assert {"op", "relation", "fact_id", "prompt_id", "condition", "prob_before", "prob_after", "rel_change",
            "metric", "value"} <= set(edits.columns)
    scale = edits[(edits.op == "suppress") & edits.prompt_id.notna()]
    assert scale.groupby("relation").fact_id.nunique().max() <= 2
    assert_same_numbers(scale.rel_change, (scale.prob_after - scale.prob_before) / scale.prob_before, scale=1.0,
                        what="rel_change")
    assert scale.top_id_before.notna().all() and scale.top_id_after.notna().all()
    assert {("kn", "same_relation"), ("random", "same_relation"), ("activation", "target")} <= \
        set(scale.groupby(["condition", "scope"]).size().index)
    summary = json.loads((run_dir / "edits.json").read_text())
    criteria = pd.DataFrame(summary["criteria"])
    assert {"reliability", "locality_same_relation", "locality_other_relation"} <= set(criteria.metric)
    assert {"kn", "random", "activation"} <= set(criteria[criteria.op == "suppress"].condition)
    valued = criteria[criteria.n_edits > 0]  # (a criterion with no prompt that counts has no value)
    assert len(valued) and (valued.too_few == (valued.n_edits < 5)).all()  # 2 facts x 2 relations: too few edits
    assert valued[valued.too_few].ci_low.isna().all() and valued[valued.too_few].ci_high.isna().all()
    ranged = valued[~valued.too_few].astype({"ci_low": float, "ci_high": float})
    assert (ranged.ci_low <= ranged["mean"] + 1e-12).all() and (ranged["mean"] <= ranged.ci_high + 1e-12).all()
    assert summary["intervals"]["min_units"] == 5
    assert "criteria, mean over edits" in printed and "too few for an interval" in printed
    kn_all = summary["results"]["suppress"]["kn"]["ALL"]
    assert {"n_known", "n_prompts", "flip_rate", "gain_rate", "gain_rate_all"} <= set(kn_all) and "flip_rate" in printed
    update_all = summary["results"]["update"]["kn"]["ALL"]
    assert {"destructive", "n_destructive", "collateral_ppl_ratio", "success_rate_raw"} <= set(update_all)
    assert summary["runs"]["update"]["settings"]["destructive_ppl_ratio"] == 10.0
    assert set(summary["results"]["suppress"]) == {"kn", "activation", "random", "other_relation"}
    assert {"ALL", "P36", "P37"} <= set(summary["results"]["suppress"]["kn"])
    assert summary["runs"]["update"]["settings"]["lambda2"] == 8.0
    # re-running one op replaces its parts only
    assert main(["edit", str(run_dir), "--op", "amplify", "--max-facts", "1", "--no-progress"]) == 0
    again = _edits(run_dir).to_pandas()
    assert again[again.op == "amplify"].fact_id.nunique() == 2 and (again.op == "update").sum() == (edits.op == "update").sum()


@pytest.mark.numerics
def test_cli_edits_a_run_made_offloaded_offloaded_with_the_resident_numbers(run_dir, runner, tmp_path, monkeypatch):
    """A run attributed with --max-memory cpu=64KiB --offload-dir D: `kn-ray edit` loads the model
    as run.json recorded it (blocks offloaded to D) and writes the rows of the resident model."""
    offload = tmp_path / "offload"
    flags = ["attribute", "--model", str(run_dir.parent / "model"), "--facts", "f.jsonl", "--output", "o",
             "--precision", "fp32", "--max-memory", "cpu=64KiB", "--offload-dir", str(offload)]
    recorded = options_from_spec(spec_from_args(build_parser().parse_args(flags))).as_dict()  # run.json's options
    prompts = _prompts()
    kn, rn = _neurons(prompts)
    out = write_tables(tmp_path / "out", {"identity": {"model": str(run_dir.parent / "model")}, "options": recorded},
                       prompts=prompts, knowledge_neurons=kn, relation_neurons=rn)
    loaded = []
    load = EditRunner.load.__func__
    monkeypatch.setattr(EditRunner, "load", classmethod(lambda cls, placement: loaded.append(load(cls, placement))
                                                         or loaded[-1]))
    assert main(["edit", str(out), "--op", "suppress,update,erase", "--max-facts", "1", "--no-progress"]) == 0
    [edit_runner] = loaded
    assert edit_runner.lm.offloaded and "disk" in set(edit_runner.lm.model.hf_device_map.values())
    summary = json.loads((out / "edits.json").read_text())
    assert summary["runs"]["update"]["offload_dir"] == str(offload)
    for op in ("suppress", "update", "erase"):
        for unit in EditCorpus(out).units(op, EditSettings(max_facts=1)):
            got = pq.read_table(out / "edits" / f"part-{op}-{unit.index:05d}.parquet").to_pandas()
            assert len(got)
            assert_same_edit_rows(got, as_table(runner.run(unit)).to_pandas())  # the resident model's rows


def test_edits_run_on_the_cluster_at_ray_address_by_default(monkeypatch):
    """A driver on a cluster's head node may have no GPU: with $RAY_ADDRESS and no --workers the
    units go to one Ray actor; without it, or with --local, they run in this process."""
    from kn_ray.stages.edit import actors, stage

    calls = []
    monkeypatch.setattr(actors, "run_units", lambda units, placement, workers: calls.append(("ray", workers)) or [])
    monkeypatch.setattr(EditRunner, "load", classmethod(lambda cls, placement: calls.append(("here", None))))
    placement, units = Placement("m"), ["unit"]
    for address, options, where in ((None, EditOptions(), ("here", None)),
                                    ("ray://head:10001", EditOptions(), ("ray", 1)),
                                    ("ray://head:10001", EditOptions(local=True), ("here", None)),
                                    (None, EditOptions(workers=3), ("ray", 3))):
        if address:
            monkeypatch.setenv("RAY_ADDRESS", address)
        else:
            monkeypatch.delenv("RAY_ADDRESS", raising=False)
        stage._execute(units, placement, options)
        assert calls[-1] == where


def test_cli_explains_a_run_without_aggregation(tmp_path, capsys):
    write_tables(tmp_path, None, prompts=_prompts())
    assert main(["edit", str(tmp_path), "--op", "suppress"]) == 2
    assert "kn-ray aggregate" in capsys.readouterr().err


def _unaggregated(out):
    """A hand-built run of two prompts per fact whose every prompt scores neuron (1, 7) highest."""
    prompts = _prompts()
    ok = prompts[prompts.status == "ok"]
    neurons = pd.DataFrame([dict(prompt_id=r.prompt_id, fact_id=r.fact_id, relation=r.relation, layer=1, neuron=7,
                                 score=1.0) for r in ok.itertuples()])
    return write_tables(out, {"identity": {"model": str(out / "no-model-is-loaded")}}, prompts=prompts, neurons=neurons)


def test_edit_with_no_knowledge_neurons_says_why_and_writes_an_empty_table(tmp_path, capsys):
    """Two prompts per fact, the default minimum 3: aggregate finds none; edit says so with
    aggregate.json's counts and thresholds, writes an empty table and edits.json, exits 0."""
    from kn_ray.pipeline.rundir import RunDirectory

    out = _unaggregated(tmp_path / "out")
    assert main(["aggregate", str(out)]) == 0
    assert RunDirectory(out).summary("aggregate")["counts"]["ig"]["knowledge_neurons"] == 0
    capsys.readouterr()
    assert main(["edit", str(out), "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "suppress, amplify, update, erase: nothing to edit: no fact has knowledge neurons" in printed
    assert "0 knowledge neurons (ig) over 7 facts" in printed and "7 of them have fewer than the 3 prompts required" in printed
    assert "t = 0.2, p = 0.7 and at least 3 prompts" in printed and "--min-prompts" in printed
    assert "Nothing was edited" in printed
    edits = pd.read_parquet(out / "edits")
    assert edits.empty and pq.read_schema(sorted((out / "edits").iterdir())[0]).equals(EDITS)
    runs = json.loads((out / "edits.json").read_text())["runs"]
    assert set(runs) == {"suppress", "amplify", "update", "erase"}
    assert all(r["units"] == 0 and r["note"].startswith("nothing to edit: no fact has knowledge neurons") for r in runs.values())
    from kn_ray.stages.report.analytics import Analytics
    from kn_ray.stages.report.html import _edit_sections

    [(section, figure)] = _edit_sections(Analytics(out), "")
    assert figure is None and "edits has no rows. suppress, amplify, update, erase: nothing to edit" in section.note


def test_edit_of_facts_without_knowledge_neurons_names_the_selection(tmp_path, capsys):
    prompts = _prompts()
    kn, rn = _neurons(prompts)
    out = write_tables(tmp_path, None, prompts=prompts, knowledge_neurons=kn[kn.relation == "P36"],
                       relation_neurons=rn[rn.relation == "P36"])
    assert main(["edit", str(tmp_path), "--fact-id", "P37-france", "--fact-id", "P37-germany", "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert "nothing to edit: none of the 2 selected facts has knowledge neurons (4 facts of the run have some)" in printed
    assert pd.read_parquet(out / "edits").empty


def test_edit_of_a_run_without_a_usable_prompt_counts_its_statuses(tmp_path, capsys):
    prompts = _prompts().assign(status="error", error="bad record")
    prompts.loc[0, "status"] = "skipped"
    kn, rn = (frame.iloc[:0] for frame in _neurons(_prompts()))
    out = write_tables(tmp_path, None, prompts=prompts, knowledge_neurons=kn, relation_neurons=rn)
    assert main(["edit", str(out), "--no-progress"]) == 0
    printed = " ".join(capsys.readouterr().out.split())
    assert f"nothing to edit: no prompt of the run is usable: {out}/prompts holds 14 error, 1 skipped and none 'ok'" \
        in printed and pd.read_parquet(out / "edits").empty


@pytest.mark.parametrize("flag, value", [("--relation", "P999"), ("--fact-id", "P36-atlantis")])
def test_edit_of_a_relation_or_fact_the_run_lacks_is_an_error_naming_it(run_dir, capsys, flag, value):
    assert main(["edit", str(run_dir), flag, value, "--op", "suppress", "--no-progress"]) == 2
    error = capsys.readouterr().err
    assert f"{flag} {value}: no such" in error and "P36" in error and "Traceback" not in error


def test_save_reloads_to_the_same_edited_weights(run_dir, runner, tmp_path):
    edit = save_edit(run_dir, EditOptions(ops=("update",), fact_ids=("P36-germany",)), tmp_path / "edited")
    reloaded = load_model(str(tmp_path / "edited"), device="cpu")
    lm, slots = runner.lm, [tuple(n) for n in edit["neurons"]]
    assert edit["new_object"] in {"paris", "rome", "madrid"} and (2, 5) not in slots
    with edited(lm, slots):
        apply_update(lm, slots, edit["old_token_id"], edit["new_token_id"], 1.0, 8.0)
        expected = lm.model.state_dict()
        got = reloaded.model.state_dict()
        assert all(torch.equal(got[k], v) for k, v in expected.items() if k in got)
    assert any(not torch.equal(value_slot(reloaded, *s), value_slot(lm, *s)) for s in slots)  # lm was restored
    assert json.loads((tmp_path / "edited" / "kn_ray_edit.json").read_text())["fact_id"] == "P36-germany"
    with pytest.raises(ValueError, match="exactly one"):
        save_edit(run_dir, EditOptions(ops=("update",)), tmp_path / "nope")


@pytest.mark.slow  # two actor processes each load torch: about a minute on two shared cores
def test_ray_actors_give_the_rows_of_a_local_run(run_dir, runner, ray_local):
    from kn_ray.stages.edit.actors import run_units

    units = EditCorpus(run_dir).units("suppress", EditSettings(control_prompts=2), unit_facts=2)
    placement = Placement(str(run_dir.parent / "model"), precision="fp32")
    remote = {unit.index: rows for unit, rows in run_units(units, placement, workers=2)}
    assert sorted(remote) == [u.index for u in units]
    for unit in units:
        assert_same_edit_rows(remote[unit.index], runner.run(unit))  # 1-thread actors vs this process


def test_corpus_builds_the_prompts_of_the_criteria(tmp_path):
    """Held-out templates with neurons from the others, the reversed fact of a symmetric relation,
    and other facts of the relation, all from the run's tables."""
    template = "[X] is a twin city of [Y]."
    rows, neurons = [], []
    for fact, (subject, obj) in {"P190-paris": ("paris", "rome"), "P190-berlin": ("berlin", "london")}.items():
        for i, wrap in enumerate(TEMPLATES):
            pid = f"{fact}-{i}"
            rows.append(dict(prompt_id=pid, fact_id=fact, relation="P190", subject=subject, object=obj,
                             template=template, prompt=wrap.format(f"{subject} is a twin city of"), target=" " + obj,
                             status="ok", max_score=1.0))
            neurons += [dict(prompt_id=pid, fact_id=fact, relation="P190", layer=1, neuron=7, score=1.0),
                        dict(prompt_id=pid, fact_id=fact, relation="P190", layer=2, neuron=9 + i, score=0.5),
                        dict(prompt_id=pid, fact_id=fact, relation="P190", layer=0, neuron=3, score=0.1)]  # below t
    kn = pd.DataFrame([dict(fact_id=f, relation="P190", layer=1, neuron=7, method="ig") for f in ("P190-paris", "P190-berlin")])
    out = write_tables(tmp_path / "out", None, prompts=pd.DataFrame(rows), neurons=pd.DataFrame(neurons),
                       knowledge_neurons=kn)
    items = {item.fact_id: item for item in EditCorpus(out).scale_items(EditSettings(ppl_facts=1))}
    paris = items["P190-paris"]
    assert [(r.prompt, r.target) for r in paris.reverse] == [("rome is a twin city of", " paris")] * 2
    assert len(paris.heldout) == 1 and paris.heldout[0] in paris.prompts
    seen = next(i for i, r in enumerate(paris.prompts) if r not in paris.heldout)
    assert paris.seen_kn == sorted([(1, 7), (2, 9 + seen)])  # the seen prompt's coarse neurons (n = 1)
    assert {r.prompt_id for r in paris.same_relation} == {"P190-berlin-0", "P190-berlin-1"}


def test_edits_measure_the_known_prompts_only(run_dir, runner, tmp_path):
    """A prompt the model does not know (attributed with --attribute-unknown: status 'ok', known
    false) is not usable, as in aggregation: the edits leave it out, and count it once the run was
    aggregated with --include-unknown; it changes the fact's numbers."""
    prompts = _prompts().assign(known=lambda f: f.status.eq("ok").where(f.status.eq("ok")))
    unknown = dict(prompts[prompts.prompt_id == "P36-france-1"].iloc[0], prompt_id="P36-france-unknown",
                   prompt="in short , in short , the capital of france is", known=False)
    kn, rn = _neurons(prompts)
    config = {"identity": {"model": str(run_dir.parent / "model")}, "options": {"placement": {"precision": "fp32"}}}
    out = write_tables(tmp_path / "out", config, prompts=pd.concat([prompts, pd.DataFrame([unknown])]),
                       knowledge_neurons=kn, relation_neurons=rn)

    def suppress(include_unknown: bool) -> pd.DataFrame:
        RunDirectory(out).write_summary("aggregate", {"parameters": {"include_unknown": include_unknown}})
        corpus = EditCorpus(out, fact_ids=["P36-france"])
        rows = pd.concat([runner.run(u) for u in corpus.units("suppress", EditSettings(control_prompts=2))])
        return rows[(rows.fact_id == "P36-france") & (rows.condition == "kn") & (rows.scope == "target")]

    known_only, every = suppress(False), suppress(True)
    assert sorted(known_only.prompt_id) == ["P36-france-0", "P36-france-1"]
    assert sorted(every.prompt_id) == ["P36-france-0", "P36-france-1", "P36-france-unknown"]
    assert not np.isclose(known_only.rel_change.mean(), every.rel_change.mean())
    # the known prompts' own rows do not depend on the unknown one
    pd.testing.assert_series_equal(known_only.set_index("prompt_id").rel_change,
                                   every.set_index("prompt_id").rel_change.drop("P36-france-unknown"))
