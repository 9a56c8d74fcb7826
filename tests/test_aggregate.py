"""kn-ray aggregate: each rule on hand-built runs, then an independent pandas computation."""

from __future__ import annotations

import itertools
import json
import shutil

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from kn_ray.interfaces.cli import main as cli
from kn_ray.stages.aggregate import KNOWLEDGE_NEURONS, RELATION_NEURONS, AggregateParams, aggregate
from kn_ray.stages.aggregate.params import LEVELS
from tests.numerics import assert_same_numbers
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import NEURONS, PROMPTS
from tests.synthetic import SyntheticSpec, _as_table, write_run, write_synthetic_run, write_tables

SYNTHETIC = SyntheticSpec(facts=400, relations=5, facts_per_part=90, seed=3)  # 5 shards
KEYS = ["method", "fact_id", "layer", "neuron"]


def build(tmp_path, facts, activations=None, config=None):
    """facts: {fact_id: (relation, [per usable prompt {(layer, neuron): score}], n_skipped)}."""
    prompts, rows = [], []
    for fact_id, (relation, usable, skipped) in facts.items():
        for k, scores in enumerate(usable + [{(9, 9): 1.0, (2, 2): 0.9}] * skipped):
            prompt_id = f"{fact_id}/{k}"
            status = "ok" if k < len(usable) else "skipped"
            prompts.append({"prompt_id": prompt_id, "fact_id": fact_id, "relation": relation, "status": status,
                            "error": None if status == "ok" else "too long", "seconds": 1.0})
            rows += [{"prompt_id": prompt_id, "fact_id": fact_id, "relation": relation, "layer": layer,
                      "neuron": neuron, "score": score} for (layer, neuron), score in scores.items()]
    return write_tables(tmp_path, config, prompts=pd.DataFrame(prompts), neurons=pd.DataFrame(rows), activations=activations)


def knowledge_neurons(out, method="ig") -> pd.DataFrame:
    frame = pq.read_table(out / "knowledge_neurons").to_pandas()
    return frame[frame.method == method].sort_values(KEYS).reset_index(drop=True)


def neuron_set(frame, fact_id=None) -> set:
    frame = frame if fact_id is None else frame[frame.fact_id == fact_id]
    return set(zip(frame.layer, frame.neuron))


MAX = {(5, 1): 1.0}  # every prompt's max


def test_coarse_threshold_and_sharing_rule(tmp_path):
    fact_a = [MAX | {(3, 7): 0.2, (2, 2): 0.5}, MAX | {(3, 7): 0.2, (2, 2): 0.5},
              MAX | {(3, 7): 0.2}, MAX | {(3, 7): 0.15}]
    out = build(tmp_path, {
        "A": ("R1", fact_a, 1),  # the skipped prompt's (2, 2) row must not count
        "B": ("R1", [MAX, MAX], 0),  # 2 usable prompts: below the floor of 3
        "C": ("R1", [MAX | {(4, 4): 0.9, (4, 5): 0.9}] * 6 + [MAX | {(4, 4): 0.9}] + [MAX] * 3, 0),
    })
    summary = aggregate(out, AggregateParams(methods=("ig",), levels=LEVELS))  # the rule's every neuron
    kn = knowledge_neurons(out)
    # A: (5,1) in 4/4; (3,7) at exactly 0.2 x max in 3/4 >= 2.8 (>=, as the authors); (2,2) 2/4
    assert neuron_set(kn, "A") == {(5, 1), (3, 7)}
    assert neuron_set(kn, "B") == set()
    # C: 10 usable prompts, 7 >= 0.7 x 10 admits (4,4); 6 does not admit (4,5)
    assert neuron_set(kn, "C") == {(5, 1), (4, 4)}
    row = kn[(kn.fact_id == "A") & (kn.layer == 3)].iloc[0]
    assert (row.n_prompts, row.share) == (3, 0.75)
    assert row.mean_score == pytest.approx(0.2)
    assert summary["counts"]["facts_below_min_prompts"] == 1
    assert summary["counts"]["ig"]["facts_with_knowledge_neurons"] == 2

    aggregate(out, AggregateParams(t=0.25, methods=("ig",), levels=LEVELS))
    assert neuron_set(knowledge_neurons(out), "A") == {(5, 1)}
    aggregate(out, AggregateParams(p=0.5, min_prompts=2, methods=("ig",), levels=LEVELS))
    kn = knowledge_neurons(out)
    assert neuron_set(kn, "A") == {(5, 1), (3, 7), (2, 2)} and neuron_set(kn, "B") == {(5, 1)}


def test_min_prompts_floor_wins_over_small_p(tmp_path):
    out = build(tmp_path, {"A": ("R1", [MAX | {(1, 1): 0.5}] * 2 + [MAX] * 8, 0)})
    aggregate(out, AggregateParams(p=0.1, methods=("ig",)))  # 0.1 x 10 = 1, but the floor is 3
    assert neuron_set(knowledge_neurons(out)) == {(5, 1)}


def test_threshold_below_keep_ratio_is_refused(tmp_path):
    out = build(tmp_path, {"A": ("R1", [MAX] * 3, 0)}, config={"identity": {"keep": {"ratio": 0.2}}})
    with pytest.raises(ValueError, match="were not stored"):
        aggregate(out, AggregateParams(t=0.15, methods=("ig",)))
    aggregate(out, AggregateParams(t=0.2, methods=("ig",)))
    out2 = build(tmp_path / "default", {"A": ("R1", [MAX] * 3, 0)})
    with pytest.raises(ValueError, match=r"\[0.1, 1\]"):
        aggregate(out2, AggregateParams(t=0.05, methods=("ig",)))


def _fact_with_counts(counts: dict, n_prompts: int = 20) -> list[dict]:
    """n_prompts usable prompts where neuron (1, i) is coarse in counts[i] of them."""
    return [MAX | {(1, i): 0.5 for i, c in counts.items() if k < c} for k in range(n_prompts)]


def test_adaptive_p_per_relation(tmp_path):
    out = build(tmp_path, {
        # 1 + 4 at 14/20: 5 at p=0.7 ... plus (1,9) at 20/20 -> 6 > 5; p=0.75 keeps 2
        "HIGH": ("R_high", _fact_with_counts({1: 14, 2: 14, 3: 14, 4: 14, 9: 20}), 0),
        # (5,1) alone at p=0.7 -> 1 < 2; p=0.65 admits two at 13/20
        "LOW": ("R_low", _fact_with_counts({1: 13, 2: 13}), 0),
        # only (5,1), never reaches 2: six evaluations, p = 0.7 - 5 x 0.05
        "NEVER": ("R_never", _fact_with_counts({}), 0),
    })
    summary = aggregate(out, AggregateParams(adaptive=True, methods=("ig",), levels=LEVELS))
    chosen = summary["p_per_relation"]["ig"]
    assert chosen["R_high"] == {"p": 0.75, "mean_per_fact": 2.0, "evaluations": 2, "in_target": True}
    assert chosen["R_low"] == {"p": 0.65, "mean_per_fact": 3.0, "evaluations": 2, "in_target": True}
    assert chosen["R_never"] == {"p": 0.45, "mean_per_fact": 1.0, "evaluations": 6, "in_target": False}
    kn = knowledge_neurons(out)
    assert neuron_set(kn, "HIGH") == {(5, 1), (1, 9)} and len(neuron_set(kn, "LOW")) == 3

    fixed = aggregate(out, AggregateParams(methods=("ig",)))["p_per_relation"]["ig"]
    assert {c["p"] for c in fixed.values()} == {0.7} and fixed["R_high"]["mean_per_fact"] == 6.0


def test_relation_neurons_at_ten_percent(tmp_path):
    facts = {}
    for i in range(20):  # (7,7) is a knowledge neuron of 2/20 facts, (8,8) of 1/20
        extra = {(7, 7): 0.5} if i < 2 else {(8, 8): 0.5} if i == 2 else {}
        facts[f"F{i}"] = ("R1", [MAX | extra] * 3, 0)
    facts["EMPTY"] = ("R1", [], 2)  # no usable prompt: not one of the relation's facts
    out = build(tmp_path, facts)
    aggregate(out, AggregateParams(methods=("ig",)))
    relation = pq.read_table(out / "relation_neurons").to_pandas().sort_values(["layer", "neuron"])
    assert list(zip(relation.layer, relation.neuron, relation.n_facts)) == [(5, 1, 20), (7, 7, 2)]
    assert relation.share.tolist() == [1.0, 0.1]


def test_activation_baseline(tmp_path):
    acts = []
    for k in range(4):  # stored rows are >= 0.5 x the max of 4.0
        for (layer, neuron), value in {(0, 3): 4.0, (1, 1): 2.0 + k * 0.1, (2, 2): 2.2 if k < 2 else 3.0}.items():
            acts.append({"prompt_id": f"A/{k}", "fact_id": "A", "relation": "R1", "layer": layer, "neuron": neuron,
                         "activation": value})
    out = build(tmp_path, {"A": ("R1", [MAX] * 4, 0)}, activations=pd.DataFrame(acts))
    aggregate(out)
    act = knowledge_neurons(out, "activation")
    assert neuron_set(act) == {(0, 3), (1, 1), (2, 2)}
    assert act.set_index(["layer", "neuron"]).mean_score[(1, 1)] == pytest.approx(2.15)
    assert neuron_set(knowledge_neurons(out, "ig")) == {(5, 1)}
    aggregate(out, AggregateParams(activation_t=0.6))  # 0.6 x 4 = 2.4: (1,1) never, (2,2) in 2/4
    assert neuron_set(knowledge_neurons(out, "activation")) == {(0, 3)}
    with pytest.raises(ValueError, match="activation"):
        aggregate(out, AggregateParams(activation_t=0.4))


def test_repeated_prompt_rows_are_refused(tmp_path):
    once = build(tmp_path / "once", {"A": ("R1", [MAX] * 3, 0)})
    run = RunDirectory(once)
    shard = {table: run.read(table) for table in ("prompts", "neurons")}
    twice = write_run(tmp_path / "twice", run.config.as_dict(), [shard, shard]).root  # one shard's rows written twice
    with pytest.raises(ValueError, match="repeated prompt_id"):
        aggregate(twice)


def reference(out, method: str, column: str, table: str, t: float, p: float = 0.7, floor: int = 3):
    """The rules in plain pandas, whole tables in memory."""
    prompts = pd.read_parquet(out / "prompts")
    usable = prompts[prompts.status == "ok"]
    n_usable = usable.groupby("fact_id").size()
    rows = pd.read_parquet(out / table)
    rows = rows[rows.prompt_id.isin(usable.prompt_id)]
    coarse = rows[rows[column] >= t * rows.groupby("prompt_id")[column].transform("max")]
    grouped = coarse.groupby(["fact_id", "relation", "layer", "neuron"])[column].agg(["size", "mean"]).reset_index()
    grouped["usable"] = n_usable.loc[grouped.fact_id].to_numpy()
    kn = grouped[(grouped["size"] >= floor) & (grouped["size"] >= p * grouped.usable - 1e-9)]
    kn = kn.assign(method=method, n_prompts=kn["size"], share=kn["size"] / kn.usable, mean_score=kn["mean"])
    n_facts = usable.drop_duplicates("fact_id").groupby("relation").size()
    rel = kn.groupby(["relation", "layer", "neuron"]).size().rename("n_facts").reset_index()
    rel = rel[rel.n_facts >= 0.1 * n_facts.loc[rel.relation].to_numpy() - 1e-9]
    return kn.sort_values(KEYS).reset_index(drop=True), rel.assign(method=method)


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic")
    write_synthetic_run(out, SYNTHETIC)
    return out


def reference_levels(kn: pd.DataFrame, run_facts: int, relations: int = 2, min_facts: int = 2,
                     share: float = 0.5) -> pd.DataFrame:
    """The level rule in plain pandas: per (method, layer, neuron) of the candidates."""
    g = kn.groupby(["method", "layer", "neuron"]).agg(n_facts=("fact_id", "nunique"),
                                                       n_relations=("relation", "nunique")).reset_index()
    generic = (g.n_relations >= relations) | ((g.n_facts >= min_facts) & (g.n_facts >= share * run_facts - 1e-9))
    g["level"] = np.where(generic, "generic", np.where(g.n_facts >= min_facts, "relation", "fact"))
    return g


def reference_consistency(out, method: str, column: str, table: str, t: float) -> dict:
    """{fact_id: mean pairwise Jaccard of its usable prompts' coarse sets}, Python sets and loops."""
    prompts = pd.read_parquet(out / "prompts")
    usable = prompts[prompts.status == "ok"]
    rows = pd.read_parquet(out / table)
    rows = rows[rows.prompt_id.isin(usable.prompt_id)]
    coarse = rows[rows[column] >= t * rows.groupby("prompt_id")[column].transform("max")]
    sets = {p: set(zip(g.layer, g.neuron)) for p, g in coarse.groupby("prompt_id")}
    result = {}
    for fact_id, g in usable.groupby("fact_id"):
        values = [len(sets.get(a, set()) & sets.get(b, set())) / len(sets.get(a, set()) | sets.get(b, set()))
                  for a, b in itertools.combinations(sorted(g.prompt_id), 2) if sets.get(a) or sets.get(b)]
        result[fact_id] = float(np.mean(values)) if len(g) >= 2 and values else None
    return result


def test_streamed_equals_pandas_reference(synthetic_run):
    """Every level (--levels fact,relation,generic), then the default (fact-level only), the
    shared_neurons table and each fact's consistency, against plain pandas and Python."""
    aggregate(synthetic_run, AggregateParams(memory_limit="64MB", threads=2, levels=LEVELS))
    relation = pq.read_table(synthetic_run / "relation_neurons").to_pandas()
    n_facts = pd.read_parquet(synthetic_run / "prompts").query("status == 'ok'").fact_id.nunique()
    everything = {}
    for method, column, table, t in [("ig", "score", "neurons", 0.2), ("activation", "activation", "activations", 0.5)]:
        expected, expected_rel = reference(synthetic_run, method, column, table, t)
        levels = reference_levels(expected, n_facts)
        expected = expected.merge(levels[["layer", "neuron", "level"]], on=["layer", "neuron"])
        expected = expected.sort_values(KEYS).reset_index(drop=True)
        everything[method] = (expected, levels)
        got = knowledge_neurons(synthetic_run, method)
        assert len(got) > 100
        pd.testing.assert_frame_equal(got[KEYS + ["relation", "n_prompts", "level"]],
                                      expected[KEYS + ["relation", "n_prompts", "level"]], check_dtype=False)
        assert_same_numbers(got.share, expected.share, dtype="float64", what="share")
        assert_same_numbers(got.mean_score, expected.mean_score, what="mean_score")
        got_rel = relation[relation.method == method]
        assert set(zip(got_rel.relation, got_rel.layer, got_rel.neuron, got_rel.n_facts)) == \
            set(zip(expected_rel.relation, expected_rel.layer, expected_rel.neuron, expected_rel.n_facts))
        assert set(levels.level) == {"fact", "relation", "generic"}, method  # the run has all three

    summary = aggregate(synthetic_run, AggregateParams(memory_limit="64MB", threads=2))
    shared = pd.read_parquet(synthetic_run / "shared_neurons")
    consistency = pd.read_parquet(synthetic_run / "fact_consistency")
    for method, column, table, t in [("ig", "score", "neurons", 0.2), ("activation", "activation", "activations", 0.5)]:
        expected, levels = everything[method]
        got = knowledge_neurons(synthetic_run, method)
        fact_level = expected[expected.level == "fact"].reset_index(drop=True)
        pd.testing.assert_frame_equal(got[KEYS + ["n_prompts", "level"]], fact_level[KEYS + ["n_prompts", "level"]],
                                      check_dtype=False)
        counts = summary["counts"][method]
        assert counts["knowledge_neurons"] == len(fact_level) and counts["candidates"] == len(expected)
        assert counts["knowledge_neurons_per_level"] == expected.level.value_counts().reindex(LEVELS, fill_value=0).to_dict()
        assert counts["max_relations_of_a_fact_level_neuron"] == 1
        want = levels[levels.level != "fact"]
        got_shared = shared[shared.method == method]
        assert set(zip(got_shared.layer, got_shared.neuron, got_shared.level, got_shared.n_facts, got_shared.n_relations)) \
            == set(zip(want.layer, want.neuron, want.level, want.n_facts, want.n_relations))
        assert all(list(r) == sorted(set(expected[(expected.layer == l) & (expected.neuron == n)].relation))
                   for l, n, r in zip(got_shared.layer, got_shared.neuron, got_shared.relations))
        assert_same_numbers(got_shared.share.to_numpy(), (got_shared.n_facts / n_facts).to_numpy(), dtype="float64",
                            what="share")

        want_j = reference_consistency(synthetic_run, method, column, table, t)
        got_j = consistency[consistency.method == method].set_index("fact_id").jaccard
        assert set(got_j.index) == set(want_j) and sum(v is None for v in want_j.values()) > 0  # some single-prompt facts
        assert [f for f, v in want_j.items() if v is None] == sorted(got_j[got_j.isna()].index)
        known = sorted(f for f, v in want_j.items() if v is not None)
        assert_same_numbers(got_j.loc[known].to_numpy(), np.array([want_j[f] for f in known]), dtype="float64",
                            what="jaccard")
        per_relation = summary["consistency"][method]
        assert per_relation["ALL"]["mean"] == pytest.approx(np.mean([want_j[f] for f in known]))
        assert per_relation["ALL"]["median"] == pytest.approx(np.median([want_j[f] for f in known]))


def test_output_schemas_and_atomic_replace(synthetic_run):
    aggregate(synthetic_run)
    aggregate(synthetic_run)
    assert pq.read_schema(next((synthetic_run / "knowledge_neurons").glob("*.parquet"))) == KNOWLEDGE_NEURONS
    assert pq.read_schema(next((synthetic_run / "relation_neurons").glob("*.parquet"))) == RELATION_NEURONS
    assert not [p.name for p in synthetic_run.iterdir() if p.name.startswith(".")]
    saved = json.loads((synthetic_run / "aggregate.json").read_text())
    assert saved["parameters"]["t"] == 0.2 and saved["parameters"]["p"] == 0.7


def test_facts_split_across_part_files(synthetic_run, tmp_path):
    """Re-shard rows so facts straddle part files: the result must not change."""
    aggregate(synthetic_run)
    before = knowledge_neurons(synthetic_run)
    run, split, n = RunDirectory(synthetic_run), tmp_path / "split", 7
    tables = {table: run.read(table) for table in ["prompts", "neurons", "activations"]}
    size = {table: -(-rows.num_rows // n) for table, rows in tables.items()}  # rows per shard, whatever the facts
    write_run(split, run.config.as_dict(),
              [{t: rows.slice(i * size[t], size[t]) for t, rows in tables.items()} for i in range(n)])
    aggregate(split)
    pd.testing.assert_frame_equal(knowledge_neurons(split), before)


def test_cli_errors_and_success(synthetic_run, tmp_path, capsys):
    assert cli(["aggregate", str(tmp_path / "missing")]) == 2
    assert "no such output directory" in capsys.readouterr().err
    assert cli(["aggregate", str(tmp_path)]) == 2
    assert "prompts: no part-*.parquet" in capsys.readouterr().err
    assert cli(["aggregate", str(synthetic_run), "--adaptive", "--memory-limit", "128MB"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["ig"]["knowledge_neurons"] > 0 and set(printed["p_per_relation"]) == {"ig", "activation"}
    assert cli(["aggregate", str(synthetic_run), "--no-activation"]) == 0
    assert set(json.loads(capsys.readouterr().out)["p_per_relation"]) == {"ig"}
    assert set(pq.read_table(synthetic_run / "knowledge_neurons").column("method").to_pylist()) == {"ig"}


def test_reads_only_shards_marked_done(synthetic_run, tmp_path):
    """While `kn-ray attribute` runs, parts of unfinished shards (no _shards marker) are left out."""
    partial = tmp_path / "partial"
    write_synthetic_run(partial, SYNTHETIC, committed=1)
    summary = aggregate(partial)
    assert summary["counts"]["parts_of_unfinished_shards"] == {"prompts": 4, "neurons": 4, "activations": 4}
    run = RunDirectory(partial)
    first = pq.read_table(run.path(run.markers()["part-00000"]["files"]["prompts"])).to_pandas()
    assert summary["counts"]["usable_prompts"] == (first.status == "ok").sum()
    assert set(knowledge_neurons(partial).fact_id) <= set(first.fact_id)


def test_edit_finds_the_aggregates_knowledge_neurons_by_its_recorded_rule(synthetic_run, tmp_path):
    """The edit stage's held-out split applies the aggregate's rule with the parameters
    aggregate.json recorded: given every usable prompt of the facts with at least min_prompts of
    them, it finds the aggregate's ig neurons."""
    from kn_ray.stages.edit.corpus import EditCorpus

    out = tmp_path / "run"
    shutil.copytree(synthetic_run, out)
    aggregate(out, AggregateParams(t=0.3, p=0.6, min_prompts=2, methods=("ig",)))
    corpus = EditCorpus(out)
    facts = sorted(f for f in corpus.prompts.fact_id.unique() if len(corpus.refs(f)) >= 2)
    found = corpus.neurons_from(facts, {f: corpus.refs(f) for f in facts})
    kn = knowledge_neurons(out)
    expected = {f: sorted(zip(g.layer, g.neuron)) for f, g in kn[kn.fact_id.isin(facts)].groupby("fact_id")}
    assert found and {f: sorted(v) for f, v in found.items()} == expected


def test_circuit_neurons_link_each_facts_circuit_to_its_knowledge_neuron_layers(tmp_path):
    """`--neuron-run`: per fact and knowledge-neuron layer, the circuit edges into that layer's MLP,
    against a pandas computation; edges into other layers, edges beyond the circuit, other
    methods' neurons and facts without knowledge neurons stay out."""
    import pyarrow as pa

    from kn_ray.pipeline.circuit_tables import EDGES
    from kn_ray.stages.aggregate import KNOWLEDGE_NEURONS

    edges = [  # (prompt, fact, rank, sender, receiver, score)
        ("f1/0", "f1", 0, "a1.h0", "m2", 0.5), ("f1/0", "f1", 1, "m0", "m2", -0.4), ("f1/0", "f1", 2, "input", "m1", 0.3),
        ("f1/1", "f1", 0, "a1.h0", "m2", 0.3), ("f1/1", "f1", 1, "a0.h1", "logits", 0.2),
        ("f1/1", "f1", 2, "m0", "m2", 0.1),  # rank 2: beyond a circuit of 2 edges
        ("f2/0", "f2", 0, "input", "m0", 0.9), ("f3/0", "f3", 0, "input", "m2", 0.7)]
    shard = {"edges": pa.Table.from_pylist([dict(prompt_id=p, fact_id=f, relation="P1", rank=r, sender=u, receiver=v, score=s)
                                            for p, f, r, u, v, s in edges], schema=EDGES)}
    write_run(tmp_path / "circuits", None, [shard])
    kn = [("f1", 2, 7, "ig"), ("f1", 2, 9, "ig"), ("f1", 1, 3, "activation"), ("f2", 0, 1, "ig"), ("f9", 2, 1, "ig")]
    write_run(tmp_path / "neurons", None, [], later={"knowledge_neurons": pa.Table.from_pylist(
        [dict(fact_id=f, relation="P1", layer=l, neuron=n, n_prompts=3, share=1.0, mean_score=1.0, method=m)
         for f, l, n, m in kn], schema=KNOWLEDGE_NEURONS)})
    summary = aggregate(tmp_path / "circuits", AggregateParams(circuit_top=2, neuron_run=str(tmp_path / "neurons")))
    got = pd.read_parquet(tmp_path / "circuits" / "circuit_neurons")

    frame = pd.DataFrame(edges, columns=["prompt_id", "fact_id", "rank", "sender", "receiver", "score"])
    frame = frame[frame["rank"] < 2]
    layers = pd.DataFrame([k for k in kn if k[3] == "ig"], columns=["fact_id", "layer", "neuron", "method"])
    layers = layers.groupby(["fact_id", "layer"]).size().rename("n_neurons").reset_index()
    frame["layer"] = frame.receiver.str.extract(r"^m(\d+)$")[0].astype(float)
    want = frame.merge(layers, on=["fact_id", "layer"]).groupby(["fact_id", "layer", "sender"]).agg(
        n_neurons=("n_neurons", "first"), n_prompts=("prompt_id", "nunique"), mean_score=("score", "mean")).reset_index()
    assert sorted(zip(got.fact_id, got.layer, got.sender, got.n_neurons, got.n_prompts)) == \
        sorted(zip(want.fact_id, want.layer.astype(int), want.sender, want.n_neurons, want.n_prompts))
    assert len(got) == 3  # f1 layer 2: a1.h0 (2 prompts), m0 (1); f2 layer 0: input
    assert_same_numbers(got.sort_values(["fact_id", "sender"]).mean_score.to_numpy(),
                        want.sort_values(["fact_id", "sender"]).mean_score.to_numpy())
    assert list(got.sender[got.fact_id == "f1"]) == ["a1.h0", "m0"]  # by |mean score|
    assert summary["counts"]["circuit_neurons"] == {"rows": 3, "facts_with_knowledge_neurons": 2, "facts_with_a_circuit": 3}


def test_neuron_run_without_knowledge_neurons_is_a_clear_error(tmp_path):
    import pyarrow as pa

    from kn_ray.pipeline.circuit_tables import EDGES

    write_run(tmp_path / "circuits", None, [{"edges": pa.Table.from_pylist(
        [dict(prompt_id="f/0", fact_id="f", relation="P", rank=0, sender="input", receiver="m0", score=1.0)], schema=EDGES)}])
    write_run(tmp_path / "neurons", None, [])
    with pytest.raises(ValueError, match="kn-ray aggregate"):
        aggregate(tmp_path / "circuits", AggregateParams(neuron_run=str(tmp_path / "neurons")))


# ---- levels, usable prompts, consistency ------------------------------------------------------
GENERIC, RELATION, FACT = (5, 1), (7, 7), (8, 8)


def test_levels_generic_relation_and_fact(tmp_path, capsys):
    """(5,1) is a knowledge neuron of every fact of three relations (generic), (7,7) of both facts
    of R1 (relation), (8,8) of fact A1 only (fact): the default table keeps (8,8) alone, and
    shared_neurons lists the other two with their counts."""
    facts = {"A1": ("R1", [MAX | {RELATION: 0.5, FACT: 0.5}] * 3, 0), "A2": ("R1", [MAX | {RELATION: 0.5}] * 3, 0),
             "B1": ("R2", [MAX] * 3, 0), "B2": ("R2", [MAX] * 3, 0), "C1": ("R3", [MAX] * 3, 0),
             "C2": ("R3", [MAX] * 3, 0)}
    out = build(tmp_path, facts)
    summary = aggregate(out, AggregateParams(methods=("ig",)))
    kn = pq.read_table(out / "knowledge_neurons").to_pandas()
    assert list(zip(kn.fact_id, kn.layer, kn.neuron, kn.level)) == [("A1", *FACT, "fact")]
    shared = pq.read_table(out / "shared_neurons").to_pandas().set_index(["layer", "neuron"])
    assert shared.index.tolist() == [GENERIC, RELATION]  # ordered by level, then facts
    assert shared.loc[GENERIC, ["level", "n_facts", "n_relations", "share"]].tolist() == ["generic", 6, 3, 1.0]
    assert list(shared.loc[GENERIC, "relations"]) == ["R1", "R2", "R3"]
    assert shared.loc[RELATION, ["level", "n_facts", "n_relations"]].tolist() == ["relation", 2, 1]
    assert shared.loc[RELATION, "share"] == pytest.approx(2 / 6) and list(shared.loc[RELATION, "relations"]) == ["R1"]
    counts = summary["counts"]["ig"]
    assert counts["knowledge_neurons_per_level"] == {"fact": 1, "relation": 2, "generic": 6}
    assert counts["neurons_per_level"] == {"fact": 1, "relation": 1, "generic": 1}
    assert (counts["knowledge_neurons"], counts["facts_with_knowledge_neurons"], counts["candidates"]) == (1, 1, 9)
    # the paper's 10% rule over every level: (5,1) in R1, R2, R3; (7,7) and, 1 of R1's 2 facts, (8,8) in R1
    assert counts["relation_neurons"] == 5
    assert "levels_note" not in summary

    assert cli(["aggregate", str(out), "--no-activation", "--levels", "fact,relation,generic"]) == 0
    capsys.readouterr()
    kn = pq.read_table(out / "knowledge_neurons").to_pandas()
    assert sorted(zip(kn.fact_id, kn.layer, kn.neuron, kn.level)) == sorted(
        [(f, *GENERIC, "generic") for f in facts] + [("A1", *RELATION, "relation"), ("A2", *RELATION, "relation"),
                                                     ("A1", *FACT, "fact")])
    assert json.loads((out / "aggregate.json").read_text())["parameters"]["levels"] == list(LEVELS)
    # generic_relations 4, more than the run has: the note says so, and (5,1) is generic by its share of the facts
    note = aggregate(out, AggregateParams(methods=("ig",), generic_relations=4))["levels_note"]
    assert "3 relations, fewer than generic_relations (4)" in note
    assert pq.read_table(out / "shared_neurons").column("level").to_pylist() == ["generic", "relation"]
    with pytest.raises(ValueError, match="levels"):
        aggregate(out, AggregateParams(levels=("fact", "everything")))


def test_single_relation_run_notes_what_levels_cannot_tell(tmp_path):
    """One relation: generic only by share of the facts ((5,1), all 5 facts), relation (7,7) (2 of
    5 < 0.5), fact (8,8); aggregate.json says so."""
    facts = {f"F{i}": ("R1", [MAX | ({RELATION: 0.5} if i < 2 else {}) | ({FACT: 0.5} if i == 0 else {})] * 3, 0)
             for i in range(5)}
    out = build(tmp_path, facts)
    summary = aggregate(out, AggregateParams(methods=("ig",)))
    assert "1 relation" in summary["levels_note"] and "generic_share" in summary["levels_note"]
    assert json.loads((out / "aggregate.json").read_text())["levels_note"] == summary["levels_note"]
    shared = pq.read_table(out / "shared_neurons").to_pandas()
    assert sorted(zip(shared.layer, shared.neuron, shared.level)) == [(*GENERIC, "generic"), (*RELATION, "relation")]
    assert neuron_set(knowledge_neurons(out)) == {FACT}
    assert summary["consistency"]["ig"]["R1"]["facts"] == 5


def _with_known(prompts: list[dict], known: list) -> pa.Table:
    """The prompts table as the probe stage writes it: PROMPTS plus `known` (bool, null = never probed)."""
    table = _as_table(pd.DataFrame(prompts), PROMPTS)  # PROMPTS has `known` now (null): set it, never a second one
    return table.set_column(table.schema.get_field_index("known"), "known", pa.array(known, pa.bool_()))


def _as_prompts(prompts: list[dict]) -> pa.Table:
    return _as_table(pd.DataFrame(prompts), PROMPTS)


def _as_table_neurons(rows: list[dict]) -> pa.Table:
    return _as_table(pd.DataFrame(rows), NEURONS)


def _prompt(fact_id: str, k: int, relation: str = "R1", status: str = "ok") -> dict:
    return {"prompt_id": f"{fact_id}/{k}", "fact_id": fact_id, "relation": relation, "status": status, "seconds": 1.0}


def _rows(prompt_id: str, scores: dict, relation: str = "R1") -> list[dict]:
    return [{"prompt_id": prompt_id, "fact_id": prompt_id.split("/")[0], "relation": relation, "layer": layer,
             "neuron": neuron, "score": score} for (layer, neuron), score in scores.items()]


def test_unknown_prompts_are_not_usable_unless_asked(tmp_path, capsys):
    """Fact A: 3 known prompts with (3,3) and 2 the model does not know (known = false, status ok:
    attributed with the flag) without it; B: never probed (known null) in a part without the
    column at all (an older shard), still usable. Default: (3,3) in 3/3; --include-unknown: 3/5 < 0.7."""
    prompts = [_prompt("A", k) for k in range(5)]
    rows = [r for k in range(5) for r in _rows(f"A/{k}", MAX | ({(3, 3): 0.5} if k < 3 else {}))]
    shard = {"prompts": _with_known(prompts, [True, True, True, False, False]),
             "neurons": _as_table_neurons(rows)}
    older = {"prompts": _as_prompts([_prompt("B", k) for k in range(3)]),
             "neurons": _as_table_neurons([r for k in range(3) for r in _rows(f"B/{k}", MAX)])}
    out = tmp_path / "run"
    write_run(out, None, [shard, older])
    summary = aggregate(out, AggregateParams(methods=("ig",), levels=LEVELS))
    counts = summary["counts"]
    assert (counts["usable_prompts"], counts["unknown_prompts"], counts["facts_with_unknown_prompts"]) == (6, 2, 1)
    assert counts["unknown_prompts_usable"] is False
    kn = knowledge_neurons(out)
    assert neuron_set(kn, "A") == {(5, 1), (3, 3)} and neuron_set(kn, "B") == {(5, 1)}
    assert kn[(kn.fact_id == "A") & (kn.layer == 3)].share.tolist() == [1.0]
    consistency = pd.read_parquet(out / "fact_consistency").set_index("fact_id")
    assert consistency.loc["A", ["n_prompts", "n_pairs"]].tolist() == [3, 3]

    assert cli(["aggregate", str(out), "--no-activation", "--levels", "fact,relation,generic",
                "--include-unknown"]) == 0
    counts = json.loads(capsys.readouterr().out)["counts"]
    assert (counts["usable_prompts"], counts["unknown_prompts"], counts["unknown_prompts_usable"]) == (8, 2, True)
    assert neuron_set(knowledge_neurons(out), "A") == {(5, 1)}
    assert pd.read_parquet(out / "fact_consistency").set_index("fact_id").loc["A", "n_prompts"] == 5


def test_consistency_by_hand(tmp_path):
    """Mean pairwise Jaccard of each fact's usable prompts' coarse sets (>= 0.2 x the prompt's max)."""
    facts = {
        # {11,12,13}, {11,12} ((1,9) at 0.1 < 0.2 x max is not coarse), {22}: (2/3 + 0 + 0) / 3
        "X": ("R1", [{(1, 1): 1.0, (1, 2): 0.5, (1, 3): 0.5}, {(1, 1): 1.0, (1, 2): 0.5, (1, 9): 0.1},
                     {(2, 2): 1.0}], 0),
        "Y": ("R2", [{(1, 1): 1.0}], 1),  # one usable prompt: null
        "Z": ("R1", [{(1, 1): 1.0}, {(1, 1): 1.0, (1, 4): 0.3}], 0),  # 1/2
        "W": ("R1", [{}, {}], 0),  # two prompts without coarse neurons: no pair has a Jaccard
        "V": ("R1", [{(1, 1): 1.0}, {}, {}], 0),  # 0, 0 and one pair of two empty sets left out
    }
    out = build(tmp_path, facts)
    summary = aggregate(out, AggregateParams(methods=("ig",)))
    got = pd.read_parquet(out / "fact_consistency").set_index("fact_id")
    assert got.loc[["X", "Y", "Z", "W", "V"], "n_prompts"].tolist() == [3, 1, 2, 2, 3]
    assert got.loc[["X", "Y", "Z", "W", "V"], "n_pairs"].tolist() == [3, 0, 1, 0, 2]
    assert got.jaccard["X"] == pytest.approx(2 / 9) and got.jaccard["Z"] == pytest.approx(0.5)
    assert got.jaccard["V"] == 0.0 and pd.isna(got.jaccard["Y"]) and pd.isna(got.jaccard["W"])
    r1 = summary["consistency"]["ig"]["R1"]
    values = [2 / 9, 0.5, 0.0]
    assert r1["facts"] == 3 and r1["mean"] == pytest.approx(np.mean(values))
    assert [r1["q1"], r1["median"], r1["q3"]] == pytest.approx(list(np.quantile(values, [0.25, 0.5, 0.75])))
    assert summary["consistency"]["ig"]["R2"] == {"facts": 0, "mean": None, "q1": None, "median": None, "q3": None}
    assert summary["consistency"]["ig"]["ALL"]["facts"] == 3
