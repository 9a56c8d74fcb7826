"""The paper's headline table for a run, with 95% bootstrap intervals over facts, beside
the figures Dai et al. (2022) report for BERT-base on PARAREL.

    rows = paper_table("OUT")               # [{key, label, value, ci_low, ci_high, n, too_few}, ...]
    paper_markdown({"smollm2": OUT_A, "gemma3-270m": OUT_B})

Every interval resamples facts (erase: relations) with replacement, 2000 times, seeded:

* knowledge neurons per fact: over facts with a usable prompt (zeros included);
* layer share: knowledge neurons in the top third of the layers (when every layer was
  attributed) and in the upper half of the attributed layers, over facts with any;
* shared neurons and Jaccard of fact pairs within / across relations: over facts with any,
  pairs of distinct facts of the resample (as the report's overlap, kn_ray.stages.report.overlap),
  of every candidate of the paper's rule whatever its level (`Analytics.candidates()`: the
  paper's Table 2 counts them all), and beside it the fact-level neurons' (`_fact` rows: a
  fact-level neuron is one fact's, so these are 0 whenever the level rule ran);
* suppress / amplify: the mean relative change of P over each fact's prompts, then over facts;
  and what they did to the predictions (outcomes.scale_summary's flip_rate / gain_rate: shares
  of prompts, pooled over facts, resampled by fact);
* update / erase: the edit stage's criteria (kn_ray.stages.edit.criteria), CIs over edits;
  success counts a destructive edit as a failure, and the destructive share is its own row.

Over fewer than 5 units (criteria.MIN_UNITS) a row has no interval and says so (`too_few`).
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.stages.edit.criteria import bootstrap_ci, interval_text, too_few
from kn_ray.stages.report.analytics import Analytics

N_BOOT, SEED = 2000, 0

# Dai et al., ACL 2022, BERT-base-cased on PARAREL (their Tables 1-2, Figure 4 and section 5.1)
PAPER_BERT = {
    "kn_per_fact": 4.13,
    "shared_intra": 1.23,
    "shared_inter": 0.09,
    "suppress_kn": -0.29,
    "amplify_kn": 0.31,
    "suppress_random": -0.015,  # "about 1.5%" either way for their baseline
    "amplify_random": 0.015,
    "update_success": 0.344,
}

ROWS = (  # key, label, format
    ("facts", "facts (with a usable prompt)", "int"),
    ("kn_per_fact", "knowledge neurons per fact", "num"),
    ("facts_with_kn", "facts with any knowledge neuron", "pct"),
    ("activation_per_fact", "activation-baseline neurons per fact", "num"),
    ("layers", "layers attributed", "text"),
    ("top_third", "knowledge neurons in the top third of the layers", "pct"),
    ("upper_half", "knowledge neurons in the upper half of the attributed layers", "pct"),
    ("top_layer", "most frequent layer (share of knowledge neurons)", "text"),
    ("shared_intra", "shared neurons, same relation (every level: the paper's rule)", "num"),
    ("shared_inter", "shared neurons, different relations (every level: the paper's rule)", "num"),
    ("jaccard_intra", "Jaccard, same relation (every level)", "num"),
    ("jaccard_inter", "Jaccard, different relations (every level)", "num"),
    ("shared_intra_fact", "shared fact-level neurons, same relation (0 by construction)", "num"),
    ("shared_inter_fact", "shared fact-level neurons, different relations (0 by construction)", "num"),
    ("suppress_kn", "suppress (x0): knowledge neurons", "pct"),
    ("suppress_random", "suppress: random neurons, same layers", "pct"),
    ("suppress_activation", "suppress: activation baseline", "pct"),
    ("suppress_other", "suppress: other relations' prompts", "pct"),
    ("amplify_kn", "amplify (x2): knowledge neurons", "pct"),
    ("amplify_random", "amplify: random neurons, same layers", "pct"),
    ("amplify_activation", "amplify: activation baseline", "pct"),
    ("amplify_other", "amplify: other relations' prompts", "pct"),
    ("suppress_kn_flip", "suppress: known prompts whose top-1 leaves the gold (flip_rate)", "rate"),
    ("suppress_random_flip", "suppress: flip_rate, random neurons", "rate"),
    ("suppress_activation_flip", "suppress: flip_rate, activation baseline", "rate"),
    ("suppress_other_flip", "suppress: flip_rate, other relations' prompts", "rate"),
    ("amplify_kn_gain", "amplify: unknown prompts whose top-1 becomes the gold (gain_rate)", "rate"),
    ("amplify_kn_gain_all", "amplify: gain over all prompts (gain_rate_all)", "rate"),
    ("amplify_random_gain", "amplify: gain_rate, random neurons", "rate"),
    ("amplify_activation_gain", "amplify: gain_rate, activation baseline", "rate"),
    ("amplify_other_gain", "amplify: gain_rate, other relations' prompts", "rate"),
    ("update_success", "update: success (new object top-1; a destructive edit counts as a failure)", "pct"),
    ("update_success_random", "update: success, random neurons", "pct"),
    ("update_destructive", "update: destructive edits (collateral perplexity grows past the bound)", "pct"),
    ("update_destructive_random", "update: destructive edits, random neurons", "pct"),
    ("update_locality_same", "update: locality, same relation", "pct"),
    ("update_locality_other", "update: locality, other relations", "pct"),
    ("erase_reliability", "erase: reliability (correct prompts no longer correct)", "pct"),
    ("erase_locality_other", "erase: locality, other relations", "pct"),
    ("erase_reliability_random", "erase: reliability, random neurons", "pct"),
    ("erase_destructive", "erase: destructive edits (other relations' perplexity grows past the bound)", "pct"),
    ("erase_destructive_random", "erase: destructive edits, random neurons", "pct"),
)


def _row(key: str, values, *, n=None) -> dict:
    v = np.asarray(values, dtype=float)
    v = v[~np.isnan(v)]
    low, high = bootstrap_ci(v, N_BOOT, SEED)
    return _stat(key, float(v.mean()) if len(v) else math.nan, low, high, int(len(v) if n is None else n))


def _stat(key: str, value: float, low: float, high: float, n: int) -> dict:
    """A row; over fewer than MIN_UNITS units its interval is dropped and it is marked `too_few`."""
    few = too_few(n)
    return dict(key=key, value=value, ci_low=math.nan if few else low, ci_high=math.nan if few else high, n=n,
                too_few=few)


def _ratio_row(key: str, numerator: pd.Series, denominator: pd.Series) -> dict:
    """sum(numerator) / sum(denominator) over units (facts with a denominator), with a bootstrap
    interval that resamples the units (as _share_row)."""
    keep = denominator > 0
    num, den = numerator[keep].to_numpy(float), denominator[keep].to_numpy(float)
    if not len(den):
        return _stat(key, math.nan, math.nan, math.nan, 0)
    low = high = math.nan
    if not too_few(len(den)):
        draws = np.random.default_rng(SEED).integers(0, len(den), (N_BOOT, len(den)))
        low, high = np.quantile(num[draws].sum(1) / den[draws].sum(1), (0.025, 0.975))
    return _stat(key, float(num.sum() / den.sum()), float(low), float(high), len(den))


def pair_stats(kn: pd.DataFrame, seed: int = SEED, n_boot: int = N_BOOT) -> list[dict]:
    """Shared neurons and Jaccard of fact pairs within / across relations, with bootstrap CIs over
    facts. `kn`: one method's knowledge neurons (fact_id, relation, layer, neuron)."""
    facts = kn.groupby("fact_id").relation.first().sort_index()
    if len(facts) < 2:
        return [_stat(k, math.nan, math.nan, math.nan, 0)
                for k in ("shared_intra", "shared_inter", "jaccard_intra", "jaccard_inter")]
    index = {f: i for i, f in enumerate(facts.index)}
    cells = kn.assign(cell=kn.layer.astype(np.int64) * 1_000_000 + kn.neuron.astype(np.int64))
    codes = {c: j for j, c in enumerate(cells.cell.unique())}
    member = np.zeros((len(facts), len(codes)), dtype=np.float32)
    member[cells.fact_id.map(index).to_numpy(), cells.cell.map(codes).to_numpy()] = 1
    shared = member @ member.T
    sizes = member.sum(1)
    jaccard = shared / (sizes[:, None] + sizes[None, :] - shared)
    relation = pd.factorize(facts.to_numpy())[0]

    def means(idx: np.ndarray) -> np.ndarray:
        a, b = np.triu_indices(len(idx), 1)
        a, b = idx[a], idx[b]
        distinct = a != b
        a, b = a[distinct], b[distinct]
        same = relation[a] == relation[b]
        pick = lambda m, s: m[a[s], b[s]].mean() if s.any() else np.nan  # noqa: E731
        return np.array([pick(shared, same), pick(shared, ~same), pick(jaccard, same), pick(jaccard, ~same)])

    point = means(np.arange(len(facts)))
    rng = np.random.default_rng(seed)
    boot = np.array([means(rng.integers(0, len(facts), len(facts))) for _ in range(n_boot)])
    low, high = np.nanquantile(boot, 0.025, axis=0), np.nanquantile(boot, 0.975, axis=0)
    keys = ("shared_intra", "shared_inter", "jaccard_intra", "jaccard_inter")
    return [_stat(k, float(point[i]), float(low[i]), float(high[i]), len(facts)) for i, k in enumerate(keys)]


PAIR_KEYS = ("shared_intra", "shared_inter", "jaccard_intra", "jaccard_inter")


def _pair_rows(analytics: Analytics) -> list[dict]:
    """pair_stats of every candidate (ig), and the shared counts of the fact-level neurons
    (`shared_*_fact`); rows without a value where the run cannot tell (see Analytics.candidates)."""
    every, fact = analytics.candidates(), analytics.fact_level()
    rows = (pair_stats(every[every.method == "ig"]) if every is not None else
            [_stat(k, math.nan, math.nan, math.nan, 0) for k in PAIR_KEYS])
    if fact is not None:
        rows += [dict(r, key=f"{r['key']}_fact") for r in pair_stats(fact[fact.method == "ig"])
                 if r["key"].startswith("shared_")]
    return rows


def _share_row(key: str, kn: pd.DataFrame, first: int) -> dict:
    """Share of knowledge neurons in layers >= first, with a bootstrap CI over facts."""
    per_fact = kn.assign(top=kn.layer >= first).groupby("fact_id").top.agg(["sum", "size"])
    draws = np.random.default_rng(SEED).integers(0, len(per_fact), (N_BOOT, len(per_fact)))
    tops, sizes = per_fact["sum"].to_numpy()[draws].sum(1), per_fact["size"].to_numpy()[draws].sum(1)
    low, high = np.quantile(tops / sizes, (0.025, 0.975))
    return _stat(key, float(per_fact["sum"].sum() / per_fact["size"].sum()), float(low), float(high), len(per_fact))


def _layer_rows(kn: pd.DataFrame, n_layers: int, attributed: tuple[int, int]) -> list[dict]:
    """Where the knowledge neurons sit: the top third of the network (when every layer was
    attributed), the upper half of the attributed layers, and the most frequent layer."""
    first, last = attributed
    rows = [dict(key="layers", value=f"{first}-{last} of 0-{n_layers - 1}", n=0)]
    if kn.empty:
        return rows
    if first == 0:
        rows.append(_share_row("top_third", kn, n_layers - n_layers // 3))
    rows.append(_share_row("upper_half", kn, first + (last - first + 1) // 2))
    counts = kn.layer.value_counts()
    mode = int(counts.idxmax())
    rows.append(dict(key="top_layer", value=f"layer {mode} ({counts[mode] / counts.sum():.0%})", n=len(set(kn.fact_id))))
    return rows


def _scale_rows(edits: pd.DataFrame) -> list[dict]:
    rows = []
    target = edits[edits.prompt_id.notna()]
    for op in ("suppress", "amplify"):
        for condition, scope, key in (("kn", "target", "kn"), ("random", "target", "random"),
                                      ("activation", "target", "activation"),
                                      ("other_relation", "other_relation", "other")):
            part = target[(target.op == op) & (target.condition == condition) & (target.scope == scope)]
            per_fact = part.groupby("fact_id").rel_change.mean()
            rows.append(_row(f"{op}_{key}", per_fact.to_numpy()))
            rows += _prediction_rows(op, key, part)
    return rows


def _prediction_rows(op: str, key: str, part: pd.DataFrame) -> list[dict]:
    """suppress: flip_rate (known prompts whose top-1 leaves the gold); amplify: gain_rate
    (unknown prompts whose top-1 becomes the gold) and, for the knowledge neurons, gain_rate_all;
    pooled shares of prompts as outcomes.scale_summary, intervals over facts."""
    part = part[part.correct_before.notna() & part.correct_after.notna()]
    before, after = part.correct_before.astype(bool), part.correct_after.astype(bool)
    per_fact = part.assign(known=before, flip=before & ~after, unknown=~before, gain=~before & after,
                           one=1).groupby("fact_id")[["known", "flip", "unknown", "gain", "one"]].sum()
    if op == "suppress":
        return [_ratio_row(f"{op}_{key}_flip", per_fact.flip, per_fact.known)]
    rows = [_ratio_row(f"{op}_{key}_gain", per_fact.gain, per_fact.unknown)]
    if key == "kn":
        rows.append(_ratio_row(f"{op}_{key}_gain_all", per_fact.gain, per_fact.one))
    return rows


def _criteria_rows(criteria: pd.DataFrame) -> list[dict]:
    wanted = {("update", "kn", "reliability"): "update_success", ("update", "random", "reliability"): "update_success_random",
              ("update", "kn", "locality_same_relation"): "update_locality_same",
              ("update", "kn", "locality_other_relation"): "update_locality_other",
              ("erase", "kn", "reliability"): "erase_reliability",
              ("erase", "kn", "locality_other_relation"): "erase_locality_other",
              ("erase", "random", "reliability"): "erase_reliability_random",
              ("update", "kn", "destructive"): "update_destructive",
              ("update", "random", "destructive"): "update_destructive_random",
              ("erase", "kn", "destructive"): "erase_destructive", ("erase", "random", "destructive"): "erase_destructive_random"}
    rows = []
    for (op, condition, metric), key in wanted.items():
        hit = criteria[(criteria.op == op) & (criteria.condition == condition) & (criteria.metric == metric)]
        if len(hit):
            r = hit.iloc[0]
            value = math.nan if pd.isna(r["mean"]) else float(r["mean"])
            low, high = (math.nan if pd.isna(v) else float(v) for v in (r.ci_low, r.ci_high))
            rows.append(_stat(key, value, low, high, int(r.n_edits)))
    return rows


def paper_table(out, memory_limit: str = MEMORY_LIMIT) -> list[dict]:
    """The table's rows for one aggregated (and edited) run directory."""
    analytics = Analytics(out, memory_limit)
    try:
        return paper_rows(analytics)
    finally:
        analytics.close()


def paper_rows(analytics: Analytics) -> list[dict]:
    """The table's rows from an open Analytics (the report's section uses it)."""
    per_fact = analytics.neurons_per_fact()
    kn = analytics.knowledge_neurons()
    n_layers = int(analytics.run.config.lookup("model_info", "num_layers") or (kn.layer.max() + 1))
    edits = analytics.edit_rows() if analytics.has_edits() else None
    ig, act = per_fact[per_fact.method == "ig"], per_fact[per_fact.method == "activation"]
    rows = [dict(key="model", value=analytics.context()["model"], n=0), dict(key="facts", value=len(ig), n=len(ig)),
            _row("kn_per_fact", ig.n_neurons), _row("facts_with_kn", ig.n_neurons > 0),
            _row("activation_per_fact", act.n_neurons)]
    ig_kn = kn[kn.method == "ig"]
    rows += _layer_rows(ig_kn, n_layers, analytics.attributed_layers()) + _pair_rows(analytics)
    if edits is not None:
        rows += _scale_rows(edits) + _criteria_rows(analytics.edit_criteria())
    return rows


def paper_frame(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table for the HTML report: label, value, 95% CI, n."""
    by_key = {r["key"]: r for r in rows}
    return pd.DataFrame([dict(quantity=label, value=_cell(by_key[key], key, fmt), n=by_key[key].get("n"),
                              **{"paper (BERT-base)": _paper_cell(key, fmt)})
                         for key, label, fmt in ROWS if key in by_key])


def _show(key: str, fmt: str):
    if fmt == "rate":  # a share of prompts, not a change: unsigned
        return lambda v: f"{100 * v:.1f}%"
    if fmt == "pct":
        signed = key.startswith(("suppress", "amplify"))
        return (lambda v: f"{100 * v:+.1f}%") if signed else (lambda v: f"{100 * v:.1f}%")
    return lambda v: f"{v:.2f}"


def _cell(row: dict | None, key: str, fmt: str) -> str:
    if row is None:
        return "n/a"
    value = row["value"]
    if fmt in ("text", "int") or isinstance(value, str):
        return str(value)
    if value is None or math.isnan(value):
        return "n/a"
    show = _show(key, fmt)
    if row.get("too_few"):
        return f"{show(value)} ({interval_text(None, None, row.get('n'))})"
    ci = "" if math.isnan(row.get("ci_low", math.nan)) else f" [{show(row['ci_low'])}, {show(row['ci_high'])}]"
    return f"{show(value)}{ci}"


def _paper_cell(key: str, fmt: str) -> str:
    value = PAPER_BERT.get(key)
    return "" if value is None else ("~" if key.endswith("_random") else "") + _show(key, fmt)(value)


def paper_markdown(runs: dict[str, list[dict]]) -> str:
    """Markdown: one column per run (mean [95% CI]), and the paper's BERT-base figures."""
    names = list(runs)
    lines = ["| | " + " | ".join(names) + " | paper (BERT-base) |", "|---|" + "---|" * (len(names) + 1)]
    by_key = {name: {r["key"]: r for r in rows} for name, rows in runs.items()}
    lines.append("| model | " + " | ".join(str(by_key[n].get("model", {}).get("value", "")) for n in names) + " | |")
    for key, label, fmt in ROWS:
        if not any(key in by_key[n] for n in names):
            continue
        cells = [_cell(by_key[n].get(key), key, fmt) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_paper_cell(key, fmt)} |")
    return "\n".join(lines) + "\n"
