"""`--mode circuits` on a real local Ray: edges, nodes and faithfulness tables as the engine
computes them, partners chosen deterministically and recorded, resume without recomputation."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from kn_ray.engine import load_model
from kn_ray.engine.circuits import EdgeAttributor
from kn_ray.pipeline.corrupt import pair_corrupted
from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.facts import read_facts
from kn_ray.pipeline.options import Resources, RunOptions
from kn_ray.pipeline.prompts import build_prompts
from kn_ray.pipeline.summary import residuals_text, top_edges_text
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.placement import Placement
from tests.numerics import assert_same_numbers
from tests.pipeline_fixtures import EVERY_PROMPT, pararel_slice, save_tiny_model, texts_of_pararel
from tests.readers import assert_every_reader_counts


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("circuits")
    data = pararel_slice(root / "pararel", relations=("P17", "P19"), facts=4, templates=2)
    return dict(root=root, data=data, llama=save_tiny_model("llama", texts_of_pararel(data), root / "llama"))


def options(world, out, **kw):
    return RunOptions(Placement(str(world["llama"]), precision="fp32"), facts=str(world["data"]), output=str(out),
                      probe=EVERY_PROMPT, resources=Resources(workers=1), mode="circuits", n_steps=2, rule="gausslegendre",
                      top_edges=15, faithfulness_random=1, shard_size=5, **kw)


def test_circuit_tables_equal_the_engine_and_resume(world, ray_local, tmp_path):
    out = tmp_path / "out"
    first = run_pipeline(options(world, out), progress=False)
    assert first.ok
    store = RunDirectory(out)
    assert {"prompts", "edges", "nodes", "faithfulness"} <= set(store.tables()) and "neurons" not in store.tables()
    prompts = store.read("prompts").to_pandas().set_index("prompt_id")
    edges, nodes, faith = (store.read(k).to_pandas() for k in ("edges", "nodes", "faithfulness"))

    lm = load_model(str(world["llama"]), device="cpu")
    specs = [s for s in build_prompts(read_facts(world["data"]), masked=False).prompts if s.status is None]
    specs, partners = pair_corrupted(specs, lambda p: len(lm.tokenizer(p)["input_ids"]))
    ready = [s for s in specs if s.prompt_id in partners]
    assert ready and set(faith.prompt_id) == {s.prompt_id for s in ready}
    eap = EdgeAttributor(lm, precision="fp32")
    direct = eap.attribute_edges([s.prompt for s in ready], [s.target for s in ready],
                                 [partners[s.prompt_id].prompt for s in ready], n_steps=2)
    for spec, res in zip(ready, direct):
        row = faith[faith.prompt_id == spec.prompt_id].iloc[0]
        assert row.corrupted_prompt_id == partners[spec.prompt_id].prompt_id  # recorded, as chosen here
        assert_same_numbers(row.clean_metric, res.clean_metric, scale=1.0)  # a log probability: absolute error
        assert row.circuit[-1] == pytest.approx(1.0, abs=1e-3) and len(row.random) == 1
        mine = edges[edges.prompt_id == spec.prompt_id].sort_values("rank")
        want = res.top_edges(eap.graph, 15)
        assert list(mine["rank"]) == list(range(15))
        assert_same_numbers(mine.score.to_numpy(), np.array([s for _, s in want]))
        node = nodes[nodes.prompt_id == spec.prompt_id].set_index("node")
        assert len(node) == eap.graph.num_senders + 1
        assert_same_numbers(node.loc["input", "score_out"], res.scores[0].sum(), scale=float(np.abs(res.scores[0]).sum()))
        assert_same_numbers(prompts.loc[spec.prompt_id, "gold_prob"], res.gold_prob, scale=1.0)
    skipped = prompts[prompts.status == "skipped"]
    assert len(skipped) + len(ready) == len(specs) and skipped.error.str.contains("subject").all()

    for table in ("edges", "nodes", "faithfulness"):  # the consumer contract (test_consumers): every reader, marker counts
        rows = sum(marker["rows"].get(table, 0) for marker in store.markers().values())
        assert rows > 0
        assert_every_reader_counts(store.path(table), rows)
    summary = aggregate(out, AggregateParams(circuit_share=0.5, circuit_top=10))
    shared = pd.read_parquet(store.path("relation_circuits"))  # a later stage's table: any reader
    assert_every_reader_counts(store.path("relation_circuits"), len(shared))
    top = edges[edges["rank"] < 10]
    n = top.groupby("relation").fact_id.nunique()
    counts = top.groupby(["relation", "sender", "receiver"]).fact_id.nunique().reset_index(name="n_facts")
    want = counts[counts.n_facts >= 0.5 * counts.relation.map(n) - 1e-9]
    assert len(want) and summary["counts"]["relation_circuit_edges"] == len(shared) == len(want)
    assert set(zip(shared.relation, shared.sender, shared.receiver)) == set(zip(want.relation, want.sender, want.receiver))

    assert residuals_text(store, share=1e9) == ""
    assert residuals_text(store, share=0.0).count("WARNING") == 2  # both residuals, read from the run's rows
    text = top_edges_text(store, n_facts=2, k=3)
    assert text.startswith("top edges") and text.count("->") >= 2 * 4 and "faithfulness with 1% of edges" in text

    again = run_pipeline(options(world, out), progress=False)  # every shard is committed: nothing recomputed
    assert again.ok and again.resumed == first.shards and again.written == 0


def test_a_run_whose_prompts_are_all_skipped_ends_with_the_reasons(world, ray_local, tmp_path, capsys):
    """Ready prompts (a JSONL `prompts` list) have no template to corrupt: every prompt is skipped,
    and the run ends with the reason, no traceback from the empty tables."""
    import json

    from kn_ray.interfaces.jobs import run_and_summarise

    facts = tmp_path / "facts.jsonl"
    facts.write_text("\n".join(json.dumps(dict(id=f"f{i}", relation="P17", subject=s, object=o, prompts=[f"{s} is in"]))
                               for i, (s, o) in enumerate([("Paris", "France"), ("Rome", "Italy")])) + "\n")
    out = tmp_path / "out"
    opts = options(world, out)
    opts = RunOptions(opts.placement, facts=str(facts), output=str(out), probe=EVERY_PROMPT,
                      resources=Resources(workers=1), mode="circuits", n_steps=2, rule="gausslegendre",
                      top_edges=15, faithfulness_random=1, shard_size=5)
    assert run_and_summarise(opts, progress=False) == 0
    printed = capsys.readouterr()
    assert "Traceback" not in printed.out + printed.err
    assert "2 skipped" in printed.out and "circuits need a template to corrupt" in printed.out
    rows = RunDirectory(out).read("prompts").to_pandas()
    assert (rows.status == "skipped").all()


def _spec(pid, prompt, obj, corrupt=()):
    from kn_ray.pipeline.prompts import PromptSpec

    return PromptSpec(pid, pid, "P17", "s", obj, "[X] is in [Y] .", prompt, " " + obj, corrupt=tuple(corrupt))


def test_logit_diff_partners_have_another_first_target_token():
    """choose_partner: as many tokens, and (given first_token) another first object token; the
    reason says which check failed."""
    from kn_ray.pipeline.corrupt import NO_OTHER_FIRST_TOKEN, NO_SAME_LENGTH, choose_partner, partner_target

    length = lambda p: len(p.split())  # noqa: E731
    first = lambda prompt, target: target.split()[0]  # noqa: E731
    spec = _spec("a", "paris is in", "paris", [("b", "lyon is in", "paris france"), ("c", "nice is in", "rome"),
                                               ("d", "new york is in", "usa")])
    assert choose_partner(spec, length) == (spec.corrupt[0], None)  # logprob: only the length counts
    assert choose_partner(spec, length, first) == (spec.corrupt[1], None)
    assert partner_target(spec, spec.corrupt[1]) == " rome"
    shared = _spec("a", "paris is in", "paris", spec.corrupt[:1] + spec.corrupt[2:])
    assert choose_partner(shared, length, first) == (None, NO_OTHER_FIRST_TOKEN)
    assert choose_partner(_spec("a", "paris is in", "paris", spec.corrupt[2:]), length, first) == (None, NO_SAME_LENGTH)


def test_the_worker_skips_a_logit_diff_prompt_whose_partners_share_its_first_token(world):
    from kn_ray.pipeline.corrupt import NO_OTHER_FIRST_TOKEN
    from kn_ray.pipeline.worker import ShardComputer

    worker = ShardComputer(Placement(str(world["llama"]), precision="fp32"), threads=1)
    p = "Canada is located in"
    specs = [_spec("a", p, "Germany", [("b", "Germany is located in", "Germany Canada")]),
             _spec("c", p, "Germany", [("b", "Germany is located in", "Germany Canada"),
                                       ("d", "Germany is located in", "Canada")])]
    tables = worker.compute(0, specs, 2, "gausslegendre", keep=None, mode="circuits", metric="logit_diff",
                            top_edges=3, faithfulness_random=0).tables
    rows = tables["prompts"].to_pandas().set_index("prompt_id")
    assert rows.loc["a", "status"] == "skipped" and rows.loc["a", "error"] == NO_OTHER_FIRST_TOKEN
    assert rows.loc["c", "status"] == "ok"
    faith = tables["faithfulness"].to_pandas()
    assert list(faith.corrupted_prompt_id) == ["d"] and (faith.clean_metric != faith.corrupted_metric).all()


def _cli_options(*flags):
    from kn_ray.interfaces.cli import build_parser
    from kn_ray.interfaces.commands.attribute import spec_from_args
    from kn_ray.interfaces.jobs import options_from_spec

    args = build_parser().parse_args(["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out", *flags])
    return options_from_spec(spec_from_args(args))


def test_circuits_defaults_are_the_engines_fp32_and_gauss_legendre():
    """The CLI's circuits run computes as EdgeAttributor's defaults do: n_steps auto = the engine's
    fixed rule, a fixed --n-steps without --rule is Gauss-Legendre (the engine's rule, not the
    neurons' left Riemann sum), precision auto = fp32 unless the weights are half."""
    import inspect

    from kn_ray.choices import CIRCUIT_RULE, CIRCUIT_STEPS

    engine = inspect.signature(EdgeAttributor.attribute_edges).parameters
    assert (engine["n_steps"].default, engine["rule"].default) == (CIRCUIT_STEPS, CIRCUIT_RULE) == (5, "gausslegendre")
    default = _cli_options("--mode", "circuits")
    assert (default.n_steps, default.rule, default.placement.precision) == ("auto", CIRCUIT_RULE, "fp32")
    fixed = _cli_options("--mode", "circuits", "--n-steps", "8")
    assert (fixed.n_steps, fixed.rule) == (8, CIRCUIT_RULE)
    assert _cli_options("--mode", "circuits", "--n-steps", "8", "--rule", "left").rule == "left"  # asked for
    assert _cli_options("--mode", "circuits", "--precision", "bf16").placement.precision == "bf16"
    half = _cli_options("--mode", "circuits", "--dtype", "bf16").placement
    assert (half.dtype, half.precision) == ("bf16", "auto")  # half weights compute in their dtype
    neurons = _cli_options()  # unchanged: left rule (with 20 steps the paper's), precision auto
    assert (neurons.n_steps, neurons.rule, neurons.placement.precision) == ("auto", "left", "auto")


def test_edge_attributor_computes_in_fp32_unless_asked(world):
    import torch

    lm = load_model(str(world["llama"]), device="cpu")
    assert EdgeAttributor(lm).precision == "fp32"
    if torch.backends.mkldnn.is_available():
        assert EdgeAttributor(lm, precision="bf16").precision == "bf16"


def test_the_summary_warns_where_a_residual_exceeds_its_share_of_the_change(tmp_path):
    """5% of |dM| by default, per prompt counts, the worst share; a prompt with no change and
    a residual counts too; nothing is printed where every residual is small."""
    from kn_ray.pipeline.summary import residual_warnings

    rows = pd.DataFrame(dict(clean_metric=[0.0, 0.0, 1.0, 2.0], corrupted_metric=[-3.2, -1.0, 1.0, 0.0],
                             completeness=[0.5, 1e-6, 0.0, 1e-6], input_residual=[0.01, 0.2, 0.1, 0.0]))
    completeness, residual = residual_warnings(rows).splitlines()
    assert completeness.startswith("WARNING     completeness above 5% of |M(clean) - M(corrupted)| in 1 of 4 prompts "
                                   "(worst 16%)")
    assert "input_residual above 5% of |M(clean) - M(corrupted)| in 2 of 4 prompts (worst 20%; 1 with no change" \
        in residual and "--n-steps" in residual
    assert residual_warnings(rows.iloc[[3]]) == ""
    assert residual_warnings(rows.iloc[[0]].assign(completeness=0.11)) == ""  # 3.4% of 3.2
    assert "in 1 of 1 prompts (worst 3%)" in residual_warnings(rows.iloc[[0]].assign(completeness=0.11), share=0.02)
