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

from kn_ray.stages.edit.criteria import CRITERIA

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
                 "mean_prob_after"]
METRIC_COLUMNS = ["op", "condition", "relation", "metric", "n_edits", "mean"]


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
    and relation (ALL = overall). Update / erase rows carry rel_change too, over prompt scopes
    whose mean would mix the edited fact with collateral prompts: see metric_summary()."""
    frame = con.execute(f"""
        SELECT op, condition, {_relation_or_all()}, count(*) AS n,
               avg(rel_change) AS mean_rel_change, median(rel_change) AS median_rel_change,
               avg(prob_before) AS mean_prob_before, avg(prob_after) AS mean_prob_after
        FROM {source} WHERE op IN {SCALE_OPS} AND rel_change IS NOT NULL AND NOT isnan(rel_change)
          AND (coalesce(scope, 'target') = 'target' OR condition = 'other_relation')  -- the paper's rows, not the criteria's
        GROUP BY GROUPING SETS ((op, condition, relation), (op, condition))
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
                                                                         "mean_prob_before", "mean_prob_after")}}
    for row in metrics.itertuples(index=False):
        cell = out.setdefault(row.op, {}).setdefault(row.condition, {}).setdefault(row.relation, {})
        cell[row.metric] = json_number(row.mean)
        cell["n_edits"] = max(cell.get("n_edits", 0), int(row.n_edits))
    return out


def summary_text(scale: pd.DataFrame, metrics: pd.DataFrame) -> str:
    """Readable tables of every op in OUT/edits: per scaling op, the mean relative change
    (relation x condition); per update / erase, the headline metrics (before -> after)."""
    parts = []
    for op, group in scale.groupby("op", sort=False):
        table = group.pivot(index="relation", columns="condition", values="mean_rel_change")
        parts.append(f"{op}: mean relative change of P(gold)\n{_ordered(table).to_string(float_format='{:+.3f}'.format)}")
    for op, group in metrics.groupby("op", sort=False):
        table = group.pivot(index=["relation", "condition"], columns="metric", values="mean")
        parts.append(f"{op}: mean over edits\n{_ordered(_before_after(table, HEADLINE[op])).to_string()}")
    return "\n\n".join(parts) if parts else "no edit rows"


HEADLINE = {  # plain metrics, and metrics shown as "before -> after"
    "update": ["success_rate", "change_rate", "success_rate_all", "target_ppl", "same_relation_ppl",
               "other_relation_ppl"],
    "erase": ["target_accuracy", "target_ppl", "other_relation_accuracy", "other_relation_ppl"],
}


def _before_after(table: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    """One text column per headline metric; x_before and x_after become "before -> after"."""
    columns = {}
    for name in names:
        if name in table:
            columns[name] = table[name].map("{:.3f}".format)
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
