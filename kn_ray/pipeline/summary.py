"""End-of-run summary text: the run's counts, the commonest skip/error reasons, and top neurons per fact."""

from __future__ import annotations

import re

import numpy as np
import pandas as pd

from .rundir import RunDirectory
from .neuron_tables import sparse_rows

_LOCATION = re.compile(r"^\S+:\d+: ")  # 'facts/P17.jsonl:3: ' in front of input errors


def plural(n: int, one: str, many: str | None = None) -> str:
    """'1 fact', '2 facts' ('1 retry', '2 retries' with `many`)."""
    return f"{n} {one if n == 1 else (many or one + 's')}"


def summary_text(summary) -> str:
    c = summary.counts
    lines = [
        f"output      {summary.output}",
        f"prompts     {sum(c.values())}: {c.get('ok', 0)} done, {c.get('skipped', 0)} skipped, {plural(c.get('error', 0), 'error')}",
        f"workers     {summary.workers}",
        f"shards      {summary.shards}: {summary.written} written now, {summary.resumed} already done, "
        f"{len(summary.failed)} failed ({plural(summary.retries, 'retry', 'retries')}, "
        f"{plural(summary.actors_lost, 'worker')} lost, "
        f"{summary.actors_back} back)",
        f"time        {summary.seconds:.1f} s; {plural(summary.prompts_computed, 'prompt')} in {summary.dispatch_seconds:.1f} s "
        f"= {summary.throughput:.2f} prompts/s",
    ]
    p = summary.probe
    if p:
        share = p["known"] / p["prompts"] if p["prompts"] else 0.0
        lines.insert(1, f"probe       {plural(p['prompts'], 'prompt')} probed ({p['prompts_computed']} now, {p['seconds']:.1f} s): "
                        f"{p['known']} known ({share:.0%}); {plural(p['facts_chosen'], 'fact')} chosen")
        if not p["facts_chosen"] and p["prompts"]:
            lines.insert(2, "NOTHING     the model knows none of these facts under the run's --known rule: nothing "
                            "was attributed (see `probe/`; --known any attributes every prompt, as the paper did)")
    lines += [f"FAILED      {name}: {why}" for name, why in sorted(summary.failed.items())]
    return "\n".join(lines)


def probe_text(store: RunDirectory) -> str:
    """What the model knows, per relation (probe.json)."""
    from .known import summary_lines

    probe = store.summary("probe")
    if not probe or not probe.get("relations"):
        return ""
    head = f"what the model knows (a prompt is known if {probe['rule']}; a fact with >= {probe['min_known_prompts']} known prompts):"
    return "\n".join([head] + ["  " + line for line in summary_lines(probe["relations"])])


def reasons_text(store: RunDirectory, limit: int = 8) -> str:
    """The commonest reasons for skipped and error rows, input locations stripped."""
    rows = store.read("prompts", ["status", "error"], filters=[("status", "!=", "ok")]).to_pandas()
    if rows.empty:
        return ""
    rows["why"] = rows["error"].fillna("").str.replace(_LOCATION, "", regex=True)
    top = rows.groupby(["status", "why"]).size().sort_values(ascending=False).head(limit)
    return "\n".join(["not computed (commonest reasons):"] + [f"  {n:6d}  {s:7s}  {why}" for (s, why), n in top.items()])


def top_neurons_text(store: RunDirectory, n_facts: int = 3, k: int = 5) -> str:
    """The k neurons kept in most of a fact's prompts (then highest mean score), for the n facts
    the model knows best (highest mean P(object))."""
    if n_facts < 1:
        return ""
    prompts = store.read("prompts", ["fact_id", "relation", "subject", "object", "gold_prob", "status"],
                         filters=[("status", "=", "ok")]).to_pandas()
    if prompts.empty:
        return ""
    facts = (prompts.groupby(["fact_id", "relation", "subject", "object"])["gold_prob"].agg(["mean", "size"])
             .reset_index().sort_values(["mean", "fact_id"], ascending=[False, True]).head(n_facts))
    neurons = sparse_rows(store.read("neurons", filters=[("fact_id", "in", list(facts["fact_id"]))])).to_pandas()
    blocks = [_fact_block(fact, neurons[neurons["fact_id"] == fact.fact_id], k) for fact in facts.itertuples()]
    return "\n\n".join(["top neurons (kept in most of the fact's prompts, then by mean score):"] + blocks)


def residuals_text(store: RunDirectory, share: float | None = None) -> str:
    """A circuits run: `residual_warnings` over its `faithfulness` rows."""
    if not store.parts("faithfulness"):
        return ""
    return residual_warnings(store.read("faithfulness", list(RESIDUALS) + ["clean_metric", "corrupted_metric"]).to_pandas(),
                             share)


RESIDUALS = dict(completeness="compute in fp32 (--precision fp32), or more --n-steps",
                 input_residual="more --n-steps (e.g. --n-steps 12 --rule gausslegendre)")


def residual_warnings(rows: pd.DataFrame, share: float | None = None) -> str:
    """A warning per residual (`completeness`, `input_residual`) above `share` (default
    `choices.RESIDUAL_SHARE`) of |M(clean) - M(corrupted)| in any prompt: how many prompts, the
    worst share, what to change (docs/circuits.md, "Reading the residuals"). A residual where the
    metric did not change at all counts as above."""
    from kn_ray.choices import RESIDUAL_SHARE

    share = RESIDUAL_SHARE if share is None else share
    if rows.empty:
        return ""
    change = (rows["clean_metric"].astype("float64") - rows["corrupted_metric"].astype("float64")).abs().to_numpy()
    lines = []
    for name, fix in RESIDUALS.items():
        residual = rows[name].astype("float64").fillna(0.0).to_numpy()
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(change > 0, residual / change, np.where(residual > 0, np.inf, 0.0))
        bad = ratio > share
        if bad.any():
            finite = ratio[bad & np.isfinite(ratio)]
            worst = f"worst {finite.max():.0%}" if len(finite) else "none with a finite share"
            still = int((~np.isfinite(ratio)).sum())
            worst += f"; {still} with no change of the metric" if still else ""
            lines.append(f"WARNING     {name} above {share:.0%} of |M(clean) - M(corrupted)| in {int(bad.sum())} of "
                         f"{len(rows)} prompts ({worst}): the edge scores do not add up to the change; {fix}")
    return "\n".join(lines)


def top_edges_text(store: RunDirectory, n_facts: int = 3, k: int = 5) -> str:
    """A circuits run: the k top edges and the faithfulness at 1% of edges of the n facts the model
    knows best."""
    if n_facts < 1 or not store.parts("edges"):
        return ""
    faith = store.read("faithfulness").to_pandas()
    prompts = store.read("prompts", ["prompt_id", "subject", "object", "gold_prob"]).to_pandas()
    faith = faith.merge(prompts, on="prompt_id").sort_values(["gold_prob", "prompt_id"], ascending=[False, True]).head(n_facts)
    if faith.empty:  # every prompt skipped or failed: the reasons say why (an `in` filter on [] cannot bind)
        return ""
    edges = store.read("edges", filters=[("prompt_id", "in", list(faith.prompt_id)), ("rank", "<", k)]).to_pandas()
    blocks = ["top edges (largest |EAP-IG score|):"]
    for row in faith.itertuples():
        at = "" if row.fractions is None else \
            f", faithfulness with 1% of edges {np.interp(0.01, row.fractions, row.circuit):.2f}"
        lines = [f"{row.subject} -> {row.object}  [{row.relation}] vs {row.corrupted_prompt!r}  {row.metric} "
                 f"{row.clean_metric:.3f} (corrupted {row.corrupted_metric:.3f}){at}"]
        mine = edges[edges.prompt_id == row.prompt_id].sort_values("rank")
        lines += [f"  {e.sender:>8} -> {e.receiver:<8} {e.score:+.4f}" for e in mine.itertuples()]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def _fact_block(fact, neurons: pd.DataFrame, k: int) -> str:
    head = f"{fact.subject} -> {fact.object}  [{fact.relation}]  mean P(object) {fact.mean:.3f} over {plural(fact.size, 'prompt')}"
    if neurons.empty:
        return head + "\n  (no neuron kept)"
    top = (neurons.groupby(["layer", "neuron"])["score"].agg(["size", "mean"]).reset_index()
           .sort_values(["size", "mean"], ascending=False).head(k))
    rows = [f"  {'layer':>5}  {'neuron':>6}  {'prompts':>7}  {'mean score':>10}"]
    rows += [f"  {r.layer:>5}  {r.neuron:>6}  {f'{r.size}/{fact.size}':>7}  {r.mean:>10.4f}" for r in top.itertuples()]
    return "\n".join([head] + rows)


def top_traces_text(store: RunDirectory, n_facts: int = 3, k: int = 5) -> str:
    """A trace run: for the n prompts the model knows best, per kind, the restoration that brings
    back most of P(gold) (layer, token and its role), as a share of p_clean - p_corrupted."""
    if n_facts < 1 or not store.parts("traces"):
        return ""
    prompts = store.read("prompts", ["prompt_id", "relation", "subject", "object", "prompt", "p_clean", "p_corrupted"],
                         filters=[("status", "=", "ok")]).to_pandas()
    prompts = prompts.sort_values(["p_clean", "prompt_id"], ascending=[False, True]).head(n_facts)
    traces = store.read("traces", filters=[("prompt_id", "in", list(prompts.prompt_id))]).to_pandas()
    blocks = ["causal traces (the restoration that brings back most of P(object), as a share of clean - corrupted):"]
    for row in prompts.itertuples():
        lines = [f"{row.prompt!r} -> {row.object}  [{row.relation}]  P clean {row.p_clean:.3f}, "
                 f"corrupted {row.p_corrupted:.3f}"]
        mine = traces[traces.prompt_id == row.prompt_id]
        gap = row.p_clean - row.p_corrupted
        for kind, rows in mine.groupby("kind", sort=False):
            best = rows.loc[rows.p_restored.idxmax()]
            share = (best.p_restored - row.p_corrupted) / gap if gap else float("nan")
            lines.append(f"  {kind:>5}  layer {best.layer:>3}  token {best.token:>3} ({best.token_role})  "
                         f"P {best.p_restored:.3f}  {share:+.0%}")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
