"""The probe stage: what the model knows, read by one forward pass before any attribution.

Random models know nothing, so these tests choose the `--known` rule from the probe itself
(a gold rank or probability that some prompts pass and others do not)."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kn_ray.engine import Prober, load_model
from kn_ray.pipeline import known as known_mod
from kn_ray.pipeline import probe_stage
from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.faults import ENV as FAULTS
from kn_ray.pipeline.known import KnownRule, ProbePolicy, choose_facts, probe_windows
from kn_ray.pipeline.options import RunOptions, Resources
from kn_ray.pipeline.facts import Filters
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.placement import Placement
from tests.numerics import assert_same_numbers
from tests.pipeline_fixtures import pararel_slice, save_tiny_model, texts_of_pararel


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("probe")
    data = pararel_slice(root / "pararel", relations=("P17", "P19"), facts=6, templates=6)
    return dict(root=root, data=data, llama=save_tiny_model("llama", texts_of_pararel(data), root / "llama"))


def options(world, out, probe: ProbePolicy, **kw) -> RunOptions:
    kw = {"resources": Resources(workers=1), **kw}
    return RunOptions(Placement(str(world["llama"]), precision="fp32"), facts=str(world["data"]), output=str(out),
                      n_steps=2, rule="gausslegendre", shard_size=8, probe=probe, **kw)


def independent_probe(model_dir, prompts, targets) -> pd.DataFrame:
    """One plain transformers forward per prompt, in float64: P(gold) (teacher forced) and the rank
    of the gold's first token at the last prompt position."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).double().eval()
    rows = []
    for prompt, target in zip(prompts, targets):
        p_ids = tok(prompt)["input_ids"]
        ids = tok(prompt + target)["input_ids"]
        gold = ids[len(p_ids):]
        with torch.no_grad():
            logits = model(torch.tensor([ids[:-1]])).logits[0]
        logp = logits.log_softmax(-1)
        first = logits[len(p_ids) - 1]
        prob = float(sum(logp[len(p_ids) - 1 + k, g] for k, g in enumerate(gold)).exp())
        gap = (first - first[gold[0]]).abs()
        gap[gold[0]] = float("inf")
        rows.append(dict(prompt=prompt, target=target, gold_prob=prob, gold_rank=int(1 + (first > first[gold[0]]).sum()),
                         near_tie=bool(gap.min() < 1e-4)))
    return pd.DataFrame(rows)


def test_rule_parsing_and_its_errors():
    assert KnownRule.parse("top:1").known(1, 0.1) and not KnownRule.parse("top:1").known(2, 0.9)
    assert KnownRule.parse("top:5").known(5, 0.0) and not KnownRule.parse("top:5").known(None, 0.0)
    assert KnownRule.parse("prob:0.25").known(9, 0.25) and not KnownRule.parse("prob:0.25").known(1, 0.2)
    assert KnownRule.parse("any").known(None, None) and str(KnownRule.parse("top:3")) == "top:3"
    for bad in ("top:0", "top:x", "top:\u00b2", "prob:2", "prob:", "all", "any:1", ""):
        with pytest.raises(ValueError, match="expected top:K"):
            KnownRule.parse(bad)
    with pytest.raises(ValueError, match="min_known_prompts"):
        ProbePolicy(min_known_prompts=0).check()


def test_windows_grow_and_the_choice_keeps_input_order():
    ids = {"A": [f"a{i}" for i in range(11)], "B": ["b0", "b1"]}
    windows = list(probe_windows(ids, 2))
    assert windows[0] == {"A": ids["A"][:4], "B": ["b0", "b1"]}  # 2 x N first
    assert windows[1] == {"A": ids["A"][4:11]} and len(windows) == 2  # then twice as many, until none left
    assert list(probe_windows(ids, None)) == [ids]
    assert list(probe_windows(ids, 2, first=1))[0] == {"A": ids["A"][:2], "B": ["b0", "b1"]}  # `any`: N facts first
    assert choose_facts(ids, {"a9", "a1", "a5", "b1"}, 2) == ["a1", "a5", "b1"]
    assert choose_facts(ids, {"a9", "a1", "a5", "b1"}, None) == ["a1", "a5", "a9", "b1"]


@pytest.mark.numerics
def test_probe_fields_equal_an_independent_forward_pass(world):
    lm = load_model(str(world["llama"]))
    prompts = ["Italy is located in", "Rome is a city in", "Paris was born in"]
    targets = [" Italy", " France", " Paris"]
    mine = Prober(lm, precision="fp32").probe(prompts, targets)
    ref = independent_probe(world["llama"], prompts, targets)
    assert_same_numbers([p.gold_prob for p in mine], ref.gold_prob.to_numpy(), what="gold_prob")
    for probe, row in zip(mine, ref.itertuples()):
        assert row.near_tie or probe.gold_rank == row.gold_rank, (probe.prompt, probe.gold_rank, row.gold_rank)
        assert (probe.gold_rank == 1) == probe.correct


def test_pipeline_probe_equals_the_forward_pass_and_unknown_prompts_are_not_attributed(world, ray_local, tmp_path):
    """Through Ray: every prompt's probe fields equal the independent forward pass; under a rule
    that some prompts pass, only those are attributed, the others stay skipped with their fields;
    --attribute-unknown attributes them all."""
    first = run_pipeline(options(world, tmp_path / "probe", ProbePolicy(known="any", probe_only=True)), progress=False)
    assert first.ok and first.shards == 0
    probe = RunDirectory(tmp_path / "probe").read("probe").to_pandas()
    ok = probe[probe.status == "ok"]
    ref = independent_probe(world["llama"], list(ok.prompt), list(ok.target))
    assert_same_numbers(ok.gold_prob.to_numpy(), ref.gold_prob.to_numpy(), what="pipeline gold_prob")
    ties = ref.near_tie.to_numpy()
    assert (ok.gold_rank.to_numpy()[~ties] == ref.gold_rank.to_numpy()[~ties]).all()
    assert not RunDirectory(tmp_path / "probe").parts("prompts")  # probe only: nothing attributed

    threshold = float(np.quantile(ok.gold_prob, 0.6))  # about 40% of the prompts known
    rule = ProbePolicy(known=f"prob:{threshold!r}")
    run_pipeline(options(world, tmp_path / "known", rule), progress=False)
    prompts = RunDirectory(tmp_path / "known").read("prompts").to_pandas()
    neurons = RunDirectory(tmp_path / "known").read("neurons").to_pandas()
    known = prompts[prompts.known.fillna(False)]
    unknown = prompts[prompts.known == False]  # noqa: E712
    assert len(known) and len(unknown) and (known.gold_prob >= threshold).all() and (unknown.gold_prob < threshold).all()
    assert set(known.status) == {"ok"} and set(unknown.status) == {"skipped"}
    assert unknown.error.str.startswith("not known (gold rank").all() and unknown.gold_rank.notna().all()
    assert set(neurons.prompt_id) <= set(known.prompt_id) and set(known.prompt_id) <= set(neurons.prompt_id) | set()
    assert set(prompts.fact_id) == set(known.fact_id)  # only known facts are chosen

    run_pipeline(options(world, tmp_path / "all", ProbePolicy(known=f"prob:{threshold!r}", attribute_unknown=True)),
                 progress=False)
    everything = RunDirectory(tmp_path / "all").read("prompts").to_pandas()
    assert set(everything.prompt_id) == set(prompts.prompt_id) and set(everything.status) == {"ok"}
    assert everything.set_index("prompt_id").known.equals(prompts.set_index("prompt_id").known.loc[everything.prompt_id])


def test_max_facts_counts_known_facts_and_probes_only_what_it_needs(world, ray_local, tmp_path):
    out = tmp_path / "pool"
    run_pipeline(options(world, out, ProbePolicy(known="any", probe_only=True)), progress=False)
    pool = RunDirectory(out).read("probe").to_pandas()
    per_fact = pool.groupby("fact_id").gold_prob.max()
    threshold = float(per_fact.median())  # about half the facts have a known prompt
    known_ids = set(per_fact[per_fact >= threshold].index)
    rule = ProbePolicy(known=f"prob:{threshold!r}", probe_only=True)
    run_pipeline(options(world, tmp_path / "one", rule, filters=Filters(max_facts_per_relation=1)), progress=False)
    probed = RunDirectory(tmp_path / "one").read("probe").to_pandas()
    summary = RunDirectory(tmp_path / "one").summary("probe")
    from kn_ray.pipeline.facts import read_facts

    order = {}
    for fact in read_facts(world["data"]).facts:
        order.setdefault(fact.relation, []).append(fact.fact_id)
    for relation, ids in order.items():
        expected = next(f for f in ids if f in known_ids)
        chosen = [r for r in summary["relations"] if r["relation"] == relation][0]["facts_chosen"]
        assert chosen == 1
        first_window = ids[:2]  # 2 x N facts first
        mine = set(probed[probed.relation == relation].fact_id)
        assert set(first_window) <= mine
        if expected in first_window:
            assert mine == set(first_window)  # enough: no further window probed
        else:
            assert expected in mine


def test_resume_in_the_middle_of_the_probe_rewrites_nothing(world, ray_local, tmp_path, monkeypatch):
    """A probe shard fails: nothing is attributed and the run fails. The re-run computes only
    that probe shard, then attributes; a third run rewrites nothing at all."""
    monkeypatch.setattr(probe_stage, "PROBE_SHARD", 10)
    out = tmp_path / "out"
    opts = options(world, out, ProbePolicy(known="any"), resources=Resources(workers=1, max_attempts=1))
    monkeypatch.setenv(FAULTS, "fail_shard=probe-1")
    first = run_pipeline(opts, progress=False)
    assert not first.ok and first.shards == 0 and "part-probe-00001" in first.failed
    run = RunDirectory(out)
    probe_parts = {p: p.stat().st_mtime_ns for p in (out / "probe").glob("part-*.parquet")}
    assert len(probe_parts) == first.probe["shards"] - 1 and not run.parts("prompts")
    monkeypatch.delenv(FAULTS)
    second = run_pipeline(opts, progress=False)
    assert second.ok and second.probe["written"] == 1 and second.written == second.shards > 0
    assert all(p.stat().st_mtime_ns == t for p, t in probe_parts.items())
    every = {p: p.stat().st_mtime_ns for p in out.rglob("part-*")}
    third = run_pipeline(opts, progress=False)
    assert third.ok and third.probe["written"] == 0 and third.written == 0 and third.resumed == third.shards
    assert {p: p.stat().st_mtime_ns for p in out.rglob("part-*")} == every
    assert run.read("probe").num_rows == run.read("prompts").num_rows  # `any`: every fact chosen, each prompt once
