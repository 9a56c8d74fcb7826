"""Edits judged by today's criteria (EasyEdit; Niu et al., ICLR 2024), from the edits table's prompt rows.

Per edit (op, relation, fact_id, condition), each criterion is a share of prompts, where the
argmax is the model's top next token (`top_id_*`) and "correct" means it is the gold
target's first token:

* reliability, on the edited fact's prompts (scope `target`): did the edit flip the argmax, not
  only move P? suppress / erase: of the prompts correct before, the share no longer correct;
  amplify: of the prompts wrong before, the share correct after; update: the share whose
  argmax is the new object (`new_top1_after`).
* generalisation, the same on held-out paraphrases (scope `heldout`: the fact's templates that
  the neurons were not found from).
* locality, on other facts (scopes `same_relation`, `other_relation`): the share of prompts
  whose argmax did not change (1 = the edit left them alone).
* symmetry, for symmetric relations (P190 twinned city, ...), on the reversed fact's
  prompts (scope `reverse`: object and subject swapped): reliability measured there (update:
  of the reversed prompts right before, the share no longer right), and the mean relative
  change of P.

The summary gives, per (op, condition, criterion), the mean over edits and a 95% bootstrap
confidence interval over edits (facts; relations for erase); over fewer than MIN_UNITS edits
it gives no interval and says so (`too_few`). It also carries `destructive` (update / erase:
the share of edits whose collateral perplexity grew past the bound, kn_ray.stages.edit.outcomes).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

SYMMETRIC_RELATIONS = ("P190", "P47", "P530", "P3373", "P26")  # twinned city, shares border, diplomatic
# relation, sibling, spouse: (s, r, o) holds iff (o, r, s) holds
KEYS = ["op", "relation", "fact_id", "condition"]
CRITERIA = ("reliability", "generalization", "locality_same_relation", "locality_other_relation",
            "symmetry", "symmetry_rel_change")
SUMMARISED = CRITERIA + ("destructive",)  # the per-edit metrics summarised with an interval
MIN_UNITS = 5  # fewer units (edits, facts, relations) than this: no interval, "too few" instead
SCOPE_OF = {"reliability": "target", "generalization": "heldout", "symmetry": "reverse",
            "symmetry_rel_change": "reverse", "locality_same_relation": "same_relation",
            "locality_other_relation": "other_relation"}


def flipped(rows: pd.DataFrame) -> pd.Series:
    """Per prompt row: 1.0 where the edit flipped the argmax the way the op intends, 0.0 where it
    did not, NaN where the row does not count (e.g. suppress of a prompt already wrong)."""
    before = rows.correct_before.astype(bool)
    after = rows.correct_after.astype(bool)
    out = pd.Series(np.nan, index=rows.index)
    new = rows.new_top1_after if "new_top1_after" in rows else pd.Series(None, index=rows.index, dtype=object)
    update_new = (rows.op == "update") & new.notna()  # the edited fact's prompts: did the new object win?
    lose = rows.op.isin(["suppress", "erase"]) | ((rows.op == "update") & new.isna())  # e.g. its reversed fact
    gain = rows.op == "amplify"
    out[lose & before] = (~after[lose & before]).astype(float)
    out[gain & ~before] = after[gain & ~before].astype(float)
    out[update_new] = new[update_new].astype(float)
    return out


def unchanged(rows: pd.DataFrame) -> pd.Series:
    """Per prompt row: 1.0 where the argmax is the same token after the edit."""
    return (rows.top_id_before == rows.top_id_after).astype(float)


def criteria_rows(rows: pd.DataFrame) -> pd.DataFrame:
    """Metric rows (KEYS, n_neurons, metric, value): each criterion per edit, from its prompt rows."""
    rows = rows[rows.prompt_id.notna()] if "prompt_id" in rows else rows
    columns = KEYS + ["n_neurons", "metric", "value"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    frames = []
    for metric, scope in SCOPE_OF.items():
        part = rows[rows.scope == scope]
        if part.empty:
            continue
        if metric.startswith("locality"):
            values = unchanged(part)
        elif metric == "symmetry_rel_change":
            values = part.rel_change.astype(float)
        else:
            values = flipped(part)
        per_edit = part.assign(value=values).groupby(KEYS + ["n_neurons"], dropna=False).value.mean().reset_index()
        frames.append(per_edit.assign(metric=metric))
    if not frames:
        return pd.DataFrame(columns=columns)
    return pd.concat(frames, ignore_index=True)[columns].sort_values(KEYS + ["metric"], ignore_index=True)


def too_few(n) -> bool:
    """True where n units are too few for an interval (fewer than MIN_UNITS)."""
    return int(n) < MIN_UNITS


def bootstrap_ci(values, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                 min_units: int = MIN_UNITS) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean (NaNs dropped); (nan, nan) if fewer than
    `min_units` values are left: a resample of 2 values says nothing (both [1, 1] and [0, 1]
    come out of it), so it is marked too few instead (`too_few`, `interval_text`)."""
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    if not len(v) or len(v) < min_units:
        return float("nan"), float("nan")
    means = np.random.default_rng(seed).choice(v, (n_boot, len(v))).mean(1)
    return float(np.quantile(means, (1 - level) / 2)), float(np.quantile(means, (1 + level) / 2))


def interval_text(low, high, n, show=lambda v: f"{v:.2f}") -> str:
    """'[low, high]', or 'n=N, too few for an interval' (fewer than MIN_UNITS units), or '' (no value)."""
    if n is not None and not pd.isna(n) and too_few(n):
        return f"n={int(n)}, too few for an interval"
    if low is None or high is None or pd.isna(low) or pd.isna(high):
        return ""
    return f"[{show(low)}, {show(high)}]"


def criteria_summary(metrics: pd.DataFrame, seed: int = 0) -> pd.DataFrame:
    """op, condition, metric, n_edits, mean, ci_low, ci_high, too_few over the edits with a value
    (too_few: fewer than MIN_UNITS edits; the interval is then null)."""
    columns = ["op", "condition", "metric", "n_edits", "mean", "ci_low", "ci_high", "too_few"]
    metrics = metrics[metrics.metric.isin(SUMMARISED)] if len(metrics) else metrics
    if metrics.empty:
        return pd.DataFrame(columns=columns)
    out = []
    for (op, condition, metric), group in metrics.groupby(["op", "condition", "metric"], sort=True):
        values = group.value.dropna().astype(float)
        low, high = bootstrap_ci(values, seed=seed)
        out.append(dict(op=op, condition=condition, metric=metric, n_edits=len(values),
                        mean=float(values.mean()) if len(values) else float("nan"), ci_low=low, ci_high=high,
                        too_few=too_few(len(values))))
    return pd.DataFrame(out, columns=columns)


def criteria_text(summary: pd.DataFrame) -> str:
    """One table per op: rows condition, columns criterion, cells 'mean [low, high] (n)', or
    'mean (n=N, too few for an interval)'."""
    if summary.empty:
        return ""

    def text(m, lo, hi, n):
        if not n:
            return "n/a"
        return f"{m:.2f} ({interval_text(lo, hi, n)})" if too_few(n) else f"{m:.2f} {interval_text(lo, hi, n)} ({n})"

    cell = summary.assign(text=[text(m, lo, hi, n) for m, lo, hi, n in zip(summary["mean"], summary.ci_low,
                                                                          summary.ci_high, summary.n_edits)])
    parts = []
    for op, group in cell.groupby("op", sort=False):
        table = group.pivot(index="condition", columns="metric", values="text")
        table = table[[c for c in SUMMARISED if c in table]]
        parts.append(f"{op}: criteria, mean over edits [95% bootstrap CI] (edits; no interval under "
                     f"{MIN_UNITS})\n{table.to_string()}")
    return "\n\n".join(parts)


def reversed_prompt(template: str | None, subject: str, obj: str, masked: bool = False) -> tuple[str, str] | None:
    """(prompt, target) of the reversed fact (obj, r, subject) from a template, filled as the
    attribute stage fills it (kn_ray.pipeline.prompts.fill_template; masked LMs: [Y] -> [MASK]);
    None if it cannot be."""
    if not template or template.count("[X]") != 1 or template.count("[Y]") != 1:
        return None
    head, tail = template.split("[Y]")
    target = (" " if head[-1:].isspace() else "") + subject
    if masked:
        return (head + "[MASK]" + tail).replace("[X]", obj), target
    if tail.strip() not in ("", ".") or "[X]" not in head or not head.strip():
        return None
    return head.replace("[X]", obj).rstrip(), target
