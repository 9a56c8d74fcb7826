"""The edits table, its one owner: the schema, the prompt-row builder, the per-edit metric rows
and the summaries (suppress / amplify effects, update / erase metrics) that both `kn-ray edit`
(edits.json) and the report read.

Prompt rows (one per op, edit, prompt, condition, scope) hold the measurements; metric rows
(prompt_id null) are derived from them per edit, so every number in the summary traces back
to prompt rows through the formulas here (docs/experiments.md).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow as pa

from kn_ray.stages.edit.criteria import CRITERIA, criteria_rows
from kn_ray.stages.edit.options import DESTRUCTIVE_PPL_RATIO

ALL = "ALL"
EDITS = pa.schema([
    ("op", pa.string()),  # suppress | amplify | update | erase
    ("relation", pa.string()),  # of the edited fact, or the erased relation
    ("fact_id", pa.string()),  # the edited fact (null for erase, which edits a relation)
    ("prompt_id", pa.string()),  # the prompt measured (null on metric rows)
    ("condition", pa.string()),  # which neurons: kn | activation | random | other_relation
    ("scope", pa.string()),  # which prompts: target | heldout | same_relation | other_relation | reverse
    ("n_neurons", pa.int32()),
    ("prob_before", pa.float64()),  # P(gold target | prompt), unedited
    ("prob_after", pa.float64()),  # ... edited
    ("rel_change", pa.float64()),  # (after - before) / before
    ("correct_before", pa.bool_()),  # top-1 is the gold target's first token
    ("correct_after", pa.bool_()),
    ("top_id_before", pa.int64()),  # the model's top next token (the argmax), unedited
    ("top_id_after", pa.int64()),  # ... edited
    ("ppl_before", pa.float64()),  # exp(-log P(gold) / target tokens)
    ("ppl_after", pa.float64()),
    ("new_object", pa.string()),  # update: the object the fact was changed to
    ("new_prob_before", pa.float64()),  # update, target scope: P(new target | prompt)
    ("new_prob_after", pa.float64()),
    ("new_top1_after", pa.bool_()),  # update, target scope: top-1 is the new target's first token
    ("metric", pa.string()),  # metric rows: name
    ("value", pa.float64()),  # metric rows: value
])
EDIT_KEYS = ["op", "relation", "fact_id", "condition"]
SCALE_OPS = ("suppress", "amplify")  # scale activations; summarised by their rel_change
SCALE_COLUMNS = ["op", "condition", "relation", "n", "mean_rel_change", "median_rel_change", "mean_prob_before",
                 "mean_prob_after", "n_prompts", "n_known", "flip_rate", "gain_rate", "gain_rate_all"]
METRIC_COLUMNS = ["op", "condition", "relation", "metric", "n_edits", "mean"]
# Destructive edits (update / erase): the prompts an edit should leave alone, per op; an edit whose
# perplexity on them grows by more than EditSettings.destructive_ppl_ratio is destructive, and every
# metric in GUARDED (those that reward a changed prediction) counts it as a failure (0).
COLLATERAL_SCOPES = {"update": ("same_relation", "other_relation"), "erase": ("other_relation",)}
GUARDED = {"update": ("success_rate", "change_rate", "success_rate_all", "reliability", "symmetry"),
           "erase": ("reliability",)}


def prompt_row(op: str, relation: str, fact_id: str | None, condition: str, scope: str, n_neurons: int,
               prompt_id: str, before, after) -> dict:
    """One prompt row from the probes (kn_ray.engine.Probe: gold_prob, correct, top_id, perplexity)
    of the prompt before and after the edit."""
    return dict(op=op, relation=relation, fact_id=fact_id, prompt_id=prompt_id, condition=condition,
                scope=scope, n_neurons=n_neurons, prob_before=before.gold_prob, prob_after=after.gold_prob,
                rel_change=float(relative_change(before.gold_prob, after.gold_prob)),
                correct_before=before.correct, correct_after=after.correct,
                top_id_before=before.top_id, top_id_after=after.top_id,
                ppl_before=before.perplexity, ppl_after=after.perplexity)


def relative_change(before, after) -> np.ndarray:
    """(after - before) / before, NaN where before is not positive."""
    before, after = np.asarray(before, dtype=float), np.asarray(after, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 0, (after - before) / before, np.nan)


def corpus_ppl(ppl: pd.Series) -> float:
    """exp(mean log perplexity): the perplexity of a set of prompts, as the authors average it."""
    values = ppl.dropna().astype(float)
    return float(np.exp(np.log(values).mean())) if len(values) else math.nan


def metric_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Per edit (op, relation, fact_id, condition) of update / erase prompt rows:
    `{scope}_accuracy_{before,after}`, `{scope}_ppl_{before,after}`, and for update
    `success_rate`, `change_rate` (over the prompts the model got right before the edit) and
    `success_rate_all` (over all the fact's prompts)."""
    rows = rows[rows.op.isin(["update", "erase"])]
    if rows.empty:
        return pd.DataFrame(columns=EDIT_KEYS + ["n_neurons", "metric", "value"])
    keys = EDIT_KEYS + ["n_neurons"]
    per_scope = rows.groupby(keys + ["scope"], dropna=False).agg(
        accuracy_before=("correct_before", "mean"), accuracy_after=("correct_after", "mean"),
        ppl_before=("ppl_before", corpus_ppl), ppl_after=("ppl_after", corpus_ppl)).reset_index()
    long = per_scope.melt(id_vars=keys + ["scope"], var_name="measure", value_name="value")
    long["metric"] = long.scope + "_" + long.measure
    frames = [long[keys + ["metric", "value"]]]
    target = rows[(rows.op == "update") & (rows.scope == "target")]
    if len(target):
        frames.append(_update_rates(target, keys))
    return pd.concat(frames, ignore_index=True).sort_values(keys + ["metric"], ignore_index=True)


def _update_rates(target: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    known = target.correct_before.astype(bool)
    frame = target.assign(success=target.new_top1_after.astype(float).where(known),
                          changed=(~target.correct_after.astype(bool)).astype(float).where(known),
                          success_all=target.new_top1_after.astype(float))
    rates = frame.groupby(keys, dropna=False).agg(success_rate=("success", "mean"), change_rate=("changed", "mean"),
                                                  success_rate_all=("success_all", "mean")).reset_index()
    return rates.melt(id_vars=keys, var_name="metric", value_name="value")


def collateral_rows(rows: pd.DataFrame, bound: float = DESTRUCTIVE_PPL_RATIO) -> pd.DataFrame:
    """Per update / erase edit with collateral prompts (COLLATERAL_SCOPES): `collateral_ppl_ratio`,
    the largest over those scopes of corpus_ppl(after) / corpus_ppl(before), and `destructive`:
    1.0 where it exceeds `bound`, 0.0 where not, null where it cannot be told (inf / inf)."""
    keys = EDIT_KEYS + ["n_neurons"]
    columns = keys + ["metric", "value"]
    wanted = pd.Series(False, index=rows.index)
    for op, scopes in COLLATERAL_SCOPES.items():
        wanted |= (rows.op == op) & rows.scope.isin(scopes)
    part = rows[wanted & rows.prompt_id.notna()] if "prompt_id" in rows else rows[wanted]
    if part.empty:
        return pd.DataFrame(columns=columns)
    per_scope = part.groupby(keys + ["scope"], dropna=False).agg(before=("ppl_before", corpus_ppl),
                                                                after=("ppl_after", corpus_ppl)).reset_index()
    with np.errstate(divide="ignore", invalid="ignore"):
        per_scope["ratio"] = per_scope.after.to_numpy(float) / per_scope.before.to_numpy(float)
    ratio = per_scope.groupby(keys, dropna=False).ratio.max().reset_index()  # NaN only if every scope is
    flag = np.where(ratio.ratio.isna(), np.nan, (ratio.ratio > bound).astype(float))
    return pd.concat([ratio.assign(metric="collateral_ppl_ratio", value=ratio.ratio),
                      ratio.assign(metric="destructive", value=flag)], ignore_index=True)[columns]


def guard_destructive(metrics: pd.DataFrame) -> pd.DataFrame:
    """Metric rows with each GUARDED metric of a destructive edit set to 0 (a failure; a null
    stays null: nothing counted), and the unguarded value kept as `<metric>_raw` for every edit."""
    if metrics.empty or not (metrics.metric == "destructive").any():
        return metrics
    keys = EDIT_KEYS + ["n_neurons"]
    tag = lambda frame: list(zip(*(frame[k].astype(object).where(frame[k].notna(), None) for k in keys)))  # noqa: E731
    flags = metrics[metrics.metric == "destructive"]
    destroyed = {key for key, value in zip(tag(flags), flags.value) if value == 1.0}
    guarded = pd.Series([m in GUARDED.get(op, ()) for op, m in zip(metrics.op, metrics.metric)], index=metrics.index)
    raw = metrics[guarded].assign(metric=lambda f: f.metric + "_raw")
    hit = guarded & pd.Series([key in destroyed for key in tag(metrics)], index=metrics.index) & metrics.value.notna()
    out = metrics.copy()
    out.loc[hit, "value"] = 0.0
    return pd.concat([out, raw], ignore_index=True)


def edit_metric_rows(rows: pd.DataFrame, bound: float = DESTRUCTIVE_PPL_RATIO) -> pd.DataFrame:
    """Every per-edit metric row of a unit's prompt rows: update / erase metrics (metric_rows),
    the criteria (edit.criteria), the collateral perplexity and destructive flag, with the
    metrics that would reward a destructive edit counted as failures (guard_destructive)."""
    parts = [m for m in (metric_rows(rows), criteria_rows(rows), collateral_rows(rows, bound)) if len(m)]
    if not parts:
        return pd.DataFrame(columns=EDIT_KEYS + ["n_neurons", "metric", "value"])
    return guard_destructive(pd.concat(parts, ignore_index=True))


def as_table(frame: pd.DataFrame) -> pa.Table:
    """The frame in the EDITS schema; absent columns are null."""
    n = len(frame)
    columns = [pa.array(frame[f.name].tolist(), type=f.type, from_pandas=True) if f.name in frame
               else pa.nulls(n, f.type) for f in EDITS]
    return pa.Table.from_arrays(columns, schema=EDITS)


# ---- summaries (DuckDB SQL over the edits parts; `ALL` rows are the overall ones) ------------------
def _relation_or_all() -> str:
    return f"CASE WHEN grouping(relation) = 1 THEN '{ALL}' ELSE relation END AS relation"


def scale_summary(con, source: str) -> pd.DataFrame:
    """Suppress / amplify: n, mean / median rel_change and mean probabilities per op, condition
    and relation (ALL = overall), and what the edit did to the predictions: of the `n_known`
    prompts whose top-1 was the gold object before (correct_before), the share whose top-1 is no
    longer the gold after (`flip_rate`); of the others, the share whose top-1 became the gold
    (`gain_rate`), and that share over all `n_prompts` prompts (`gain_rate_all`). Update / erase
    rows carry rel_change too, over prompt scopes whose mean would mix the edited fact with
    collateral prompts: see metric_summary()."""
    valid = "rel_change IS NOT NULL AND NOT isnan(rel_change)"
    flags = "correct_before IS NOT NULL AND correct_after IS NOT NULL"
    frame = con.execute(f"""
        SELECT op, condition, {_relation_or_all()}, count(*) FILTER (WHERE {valid}) AS n,
               avg(rel_change) FILTER (WHERE {valid}) AS mean_rel_change,
               median(rel_change) FILTER (WHERE {valid}) AS median_rel_change,
               avg(prob_before) FILTER (WHERE {valid}) AS mean_prob_before,
               avg(prob_after) FILTER (WHERE {valid}) AS mean_prob_after,
               count(*) FILTER (WHERE {flags}) AS n_prompts,
               count(*) FILTER (WHERE {flags} AND correct_before) AS n_known,
               avg(CASE WHEN correct_after THEN 0.0 ELSE 1.0 END) FILTER (WHERE {flags} AND correct_before) AS flip_rate,
               avg(CASE WHEN correct_after THEN 1.0 ELSE 0.0 END) FILTER (WHERE {flags} AND NOT correct_before) AS gain_rate,
               avg(CASE WHEN correct_after AND NOT correct_before THEN 1.0 ELSE 0.0 END) FILTER (WHERE {flags})
                   AS gain_rate_all
        FROM {source} WHERE op IN {SCALE_OPS} AND prompt_id IS NOT NULL
          AND (coalesce(scope, 'target') = 'target' OR condition = 'other_relation')  -- the paper's rows, not the criteria's
        GROUP BY GROUPING SETS ((op, condition, relation), (op, condition))
        HAVING count(*) FILTER (WHERE {valid}) > 0 OR count(*) FILTER (WHERE {flags}) > 0
        ORDER BY op, condition, grouping(relation) DESC, relation""").df()
    return frame[SCALE_COLUMNS] if len(frame) else pd.DataFrame(columns=SCALE_COLUMNS)


def metric_summary(con, source: str) -> pd.DataFrame:
    """Update / erase: per op, condition, relation (ALL = overall) and metric, the number of
    edits and the mean of the per-edit metric."""
    frame = con.execute(f"""
        SELECT op, condition, {_relation_or_all()}, metric, count(value) AS n_edits, avg(value) AS mean
        FROM {source} WHERE metric IS NOT NULL AND metric NOT IN {CRITERIA}  -- those: edit.criteria
        GROUP BY GROUPING SETS ((op, condition, relation, metric), (op, condition, metric))
        ORDER BY op, condition, grouping(relation) DESC, relation, metric""").df()
    return frame[METRIC_COLUMNS] if len(frame) else pd.DataFrame(columns=METRIC_COLUMNS)


def summary_dict(scale: pd.DataFrame, metrics: pd.DataFrame) -> dict:
    """{op: {condition: {relation: {name: value}}}} for edits.json."""
    out: dict = {}
    for row in scale.itertuples(index=False):
        out.setdefault(row.op, {}).setdefault(row.condition, {})[row.relation] = {
            "n": int(row.n), **{k: json_number(getattr(row, k)) for k in ("mean_rel_change", "median_rel_change",
                                                                         "mean_prob_before", "mean_prob_after")},
            "n_prompts": int(row.n_prompts), "n_known": int(row.n_known),
            **{k: json_number(getattr(row, k)) for k in ("flip_rate", "gain_rate", "gain_rate_all")}}
    for row in metrics.itertuples(index=False):
        cell = out.setdefault(row.op, {}).setdefault(row.condition, {}).setdefault(row.relation, {})
        cell[row.metric] = json_number(row.mean)
        cell["n_edits"] = max(cell.get("n_edits", 0), int(row.n_edits))
        if row.metric == "destructive":  # a share of 0/1 flags: the count is exact
            cell["n_destructive"] = int(round(float(row.mean) * int(row.n_edits))) if row.n_edits else 0
            cell["n_judged"] = int(row.n_edits)
    return out


def summary_text(scale: pd.DataFrame, metrics: pd.DataFrame) -> str:
    """Readable tables of every op in OUT/edits: per scaling op, the mean relative change
    (relation x condition); per update / erase, the headline metrics (before -> after)."""
    parts = []
    for op, group in scale.groupby("op", sort=False):
        table = group.pivot(index="relation", columns="condition", values="mean_rel_change")
        parts.append(f"{op}: mean relative change of P(gold)\n{_ordered(table).to_string(float_format='{:+.3f}'.format)}")
        rate, what = SCALE_HEADLINE.get(op, ("flip_rate", ""))
        every = group.gain_rate_all if op == "amplify" else pd.Series(np.nan, index=group.index)
        share = group.assign(text=[_rate_text(r, k, n, a) for r, k, n, a in
                                   zip(group[rate], group.n_known, group.n_prompts, every)])
        table = share.pivot(index="relation", columns="condition", values="text")
        parts.append(f"{op}: {what}\n{_ordered(table).to_string()}")
    for op, group in metrics.groupby("op", sort=False):
        table = group.pivot(index=["relation", "condition"], columns="metric", values="mean")
        parts.append(f"{op}: mean over edits\n{_ordered(_before_after(table, HEADLINE[op])).to_string()}")
    return "\n\n".join(parts) if parts else "no edit rows"


HEADLINE = {  # plain metrics, and metrics shown as "before -> after"
    "update": ["success_rate", "change_rate", "success_rate_all", "destructive", "collateral_ppl_ratio", "target_ppl",
               "same_relation_ppl", "other_relation_ppl"],
    "erase": ["target_accuracy", "target_ppl", "other_relation_accuracy", "other_relation_ppl", "destructive",
              "collateral_ppl_ratio"],
}
SCALE_HEADLINE = {  # the prediction rate shown beside each scaling op's relative change
    "suppress": ("flip_rate", "flip_rate, of the known prompts (top-1 = gold before) the share whose top-1 leaves the "
                              "gold (known prompts)"),
    "amplify": ("gain_rate", "gain_rate, of the prompts not known before the share whose top-1 becomes the gold "
                             "(known prompts; gain_rate_all: over all prompts)"),
}


def _rate_text(rate, n_known, n_prompts, rate_all) -> str:
    cell = "n/a" if pd.isna(rate) else f"{rate:.3f}"
    return f"{cell} ({int(n_known)} of {int(n_prompts)} known)" + ("" if pd.isna(rate_all) else
                                                                   f", all {rate_all:.3f}")


def _before_after(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One text column per headline metric; x_before and x_after become "before -> after"."""
    columns = {}
    for name in names:
        if name in table:
            columns[name] = table[name].map("{:.3g}".format if name == "collateral_ppl_ratio" else "{:.3f}".format)
        elif f"{name}_before" in table:
            columns[name] = table[f"{name}_before"].map("{:.3g}".format) + " -> " + \
                table[f"{name}_after"].map("{:.3g}".format)
    return pd.DataFrame(columns, index=table.index)


def _ordered(table: pd.DataFrame) -> pd.DataFrame:
    """ALL first, then relations in order."""
    relation = table.index.get_level_values("relation")
    return table.iloc[np.lexsort([relation.astype(str), relation != ALL])]


def json_number(value) -> float | None:
    """JSON has no NaN or infinity: those become null."""
    value = float(value)
    return value if math.isfinite(value) else None
