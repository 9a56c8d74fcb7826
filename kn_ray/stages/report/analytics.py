"""The corpus report's numbers as pandas DataFrames, computed by DuckDB over the Parquet tables.

    a = Analytics("OUT")
    a.layer_histogram()   # knowledge neurons per layer and method
    a.neurons_per_fact()  # knowledge neurons of each fact (zeros included)
    a.overlap()           # shared neurons of fact pairs within vs across relations
    a.probe()             # what the model knows, per relation (probe.json; None without a probe)
    a.levels()            # knowledge-neuron candidates per level (fact / relation / generic)
    a.generic_neurons()   # the generic neurons that serve the most facts (shared_neurons)
    a.consistency()       # per relation: how alike a fact's prompts' coarse sets are (aggregate.json)
    a.run_stats()         # prompts by status, compute time and throughput per relation
    a.skip_reasons()      # why prompts were skipped or failed
    a.edit_summary()      # suppress / amplify: mean relative change per op, condition, relation
    a.edit_metrics()      # update / erase: mean of each metric per op, condition, relation
"""

from __future__ import annotations

import pandas as pd

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.aggregate.params import LEVELS, AggregateParams, has_column
from kn_ray.stages.duck import connect, source
from kn_ray.stages.edit.criteria import MIN_UNITS
from kn_ray.stages.edit.outcomes import ALL, METRIC_COLUMNS, SCALE_COLUMNS, metric_summary, scale_summary
from kn_ray.stages.report.overlap import MAX_PAIRS, overlap_of

COLUMNS = {
    "layer_histogram": ["method", "layer", "n_neurons", "share"],
    "neurons_per_fact": ["method", "fact_id", "relation", "usable_prompts", "n_neurons"],
    "overlap": ["method", "pairs", "n_facts", "n_pairs", "mean_shared", "mean_jaccard", "jaccard_pairs"],
    "run_stats": ["relation", "facts", "prompts", "ok", "usable", "skipped", "error", "probed", "known",
                  "compute_seconds", "ok_per_compute_second", "mean_gold_prob"],
    "probe": ["relation", "prompts", "known", "known_share", "median_gold_prob", "facts", "known_facts",
              "facts_chosen"],
    "levels": ["method", "level", "neurons", "knowledge_neuron_rows", "facts"],
    "generic_neurons": ["method", "layer", "neuron", "level", "n_facts", "n_relations", "relations", "share",
                        "mean_score"],
    "consistency": ["method", "relation", "facts", "mean", "q1", "median", "q3"],
    "skip_reasons": ["status", "reason", "n_prompts", "example_prompt_id"],
    "edit_summary": SCALE_COLUMNS,
    "edit_metrics": METRIC_COLUMNS,
}


class Analytics:
    """Read-only views of one output directory; `kn-ray aggregate` must have run for the neuron views."""

    def __init__(self, out, memory_limit: str = MEMORY_LIMIT):
        self.run = RunDirectory(out).require()
        self._con = connect(memory_limit)
        self._sources: dict[str, str] = {}

    def _source(self, table: str) -> str:
        if table not in self._sources:
            if table in ("knowledge_neurons", "relation_neurons", "shared_neurons", "shared_neuron_facts",
                         "fact_consistency") and not self.run.parts(table):
                raise FileNotFoundError(f"{self.run.location(table)}: missing; run `kn-ray aggregate {self.run}` first")
            self._sources[table] = source(self._con, self.run, table, union_by_name=True)
        return self._sources[table]

    def _frame(self, name: str, query: str, params=None) -> pd.DataFrame:
        frame = self._con.execute(query, params or []).df()
        return frame[COLUMNS[name]] if len(frame) else pd.DataFrame(columns=COLUMNS[name])

    @property
    def params(self) -> AggregateParams:
        """The aggregation's parameters (the defaults before `kn-ray aggregate`)."""
        return AggregateParams.recorded(self.run.summary("aggregate"))

    def usable(self, alias: str = "") -> str:
        """SQL condition: a `prompts` row is usable, by the aggregation's own rule
        (AggregateParams.usable: status 'ok' and known, unless the run was aggregated with
        --include-unknown). `alias`: the prompts table's alias in the query."""
        key = f"usable:{alias}"
        if key not in self._sources:
            self._sources[key] = self.params.usable_in(self._con, self._source("prompts"), alias)
        return self._sources[key]

    def has_column(self, table: str, column: str) -> bool:
        return has_column(self._con, self._source(table), column)

    def _usable_facts(self) -> str:
        return (f"SELECT fact_id, any_value(relation) AS relation, count(*) AS usable_prompts "
                f"FROM {self._source('prompts')} WHERE {self.usable()} GROUP BY fact_id")

    def layer_histogram(self) -> pd.DataFrame:
        """Knowledge neurons per layer; share is of the method's total (the paper's Figure 3)."""
        kn = self._source("knowledge_neurons")
        return self._frame("layer_histogram", f"""
            WITH layers AS (SELECT range AS layer FROM range((SELECT max(layer) + 1 FROM {kn}))),
                 methods AS (SELECT DISTINCT method FROM {kn}),
                 counts AS (SELECT method, layer, count(*) AS n FROM {kn} GROUP BY ALL)
            SELECT m.method, l.layer, coalesce(c.n, 0) AS n_neurons,
                   coalesce(c.n, 0) / sum(coalesce(c.n, 0)) OVER (PARTITION BY m.method) AS share
            FROM methods m CROSS JOIN layers l LEFT JOIN counts c ON c.method = m.method AND c.layer = l.layer
            ORDER BY m.method, l.layer""")

    def neurons_per_fact(self) -> pd.DataFrame:
        """Every fact with a usable prompt, per method, with its number of knowledge neurons (0 if none)."""
        kn = self._source("knowledge_neurons")
        return self._frame("neurons_per_fact", f"""
            WITH facts AS ({self._usable_facts()}),
                 counts AS (SELECT method, fact_id, count(*) AS n FROM {kn} GROUP BY ALL)
            SELECT m.method, f.fact_id, f.relation, f.usable_prompts, coalesce(c.n, 0) AS n_neurons
            FROM facts f CROSS JOIN (SELECT DISTINCT method FROM {kn}) m
            LEFT JOIN counts c ON c.method = m.method AND c.fact_id = f.fact_id
            ORDER BY m.method, f.relation, f.fact_id""")

    def attributed_layers(self) -> tuple[int, int]:
        """(first, last) layer with stored scores (a run may attribute a subset of the layers)."""
        first, last = self._con.execute(f"SELECT min(layer), max(layer) FROM {self._source('neurons')}").fetchone()
        return int(first), int(last)

    def knowledge_neurons(self) -> pd.DataFrame:
        """Every knowledge neuron: method, fact_id, relation, layer, neuron."""
        return self._con.execute(f"SELECT method, fact_id, relation, layer, neuron "
                                 f"FROM {self._source('knowledge_neurons')}").df()

    def candidates(self) -> pd.DataFrame | None:
        """Every knowledge-neuron candidate of the paper's rule, whatever its level (rule 6):
        knowledge_neurons (the kept levels) with shared_neuron_facts (the (fact, neuron) rows of
        the relation-level and generic neurons), one row per (method, fact, neuron); columns as
        knowledge_neurons(). None when the run's aggregation kept fewer levels and predates
        shared_neuron_facts (re-run `kn-ray aggregate`)."""
        kn = self._source("knowledge_neurons")
        if not self.has_column("knowledge_neurons", "level"):  # aggregated before levels: every candidate
            return self.knowledge_neurons()
        parts = [f"SELECT method, fact_id, relation, layer, neuron FROM {kn}"]
        if self.run.parts("shared_neuron_facts"):
            parts.append(f"SELECT method, fact_id, relation, layer, neuron FROM {self._source('shared_neuron_facts')}")
        elif set(self.params.levels) != set(LEVELS):
            return None
        return self._con.execute(" UNION ".join(parts) + " ORDER BY method, fact_id, layer, neuron").df()

    def fact_level(self) -> pd.DataFrame | None:
        """The fact-level knowledge neurons (knowledge_neurons.level = 'fact'); None for a run
        aggregated before levels existed."""
        kn = self._source("knowledge_neurons")
        if not self.has_column("knowledge_neurons", "level"):
            return None
        return self._con.execute(f"SELECT method, fact_id, relation, layer, neuron FROM {kn} "
                                 f"WHERE level = 'fact'").df()

    def overlap(self, max_pairs: int = MAX_PAIRS, seed: int = 0, neurons: str = "kept") -> pd.DataFrame:
        """Mean shared knowledge neurons (exact) and mean Jaccard (exact up to max_pairs pairs,
        sampled beyond) of fact pairs within ('intra') vs across ('inter') relations;
        see kn_ray.stages.report.overlap. `neurons`: 'kept' (knowledge_neurons as written),
        'all' (every candidate, the paper's rule: `candidates()`) or 'fact' (fact level only);
        an empty frame where the run cannot tell (`candidates()`, `fact_level()`: None)."""
        kn = {"kept": self.knowledge_neurons, "all": self.candidates, "fact": self.fact_level}[neurons]()
        if kn is None:
            return pd.DataFrame(columns=COLUMNS["overlap"])
        frames = [overlap_of(group, max_pairs, seed).assign(method=method) for method, group in kn.groupby("method")]
        if not frames:
            return pd.DataFrame(columns=COLUMNS["overlap"])
        return pd.concat(frames, ignore_index=True)[COLUMNS["overlap"]]

    def run_stats(self) -> pd.DataFrame:
        """Prompts by status per relation plus an 'ALL' row; `usable`: the ok prompts aggregation
        counts (known ones, by its rule); `probed` and `known`: prompts with the probe's verdict and
        the known ones among them (0 without a probe). compute_seconds sums the per-prompt
        `seconds` (worker time, not wall time); ok_per_compute_second is the throughput from it."""
        return self._frame("run_stats", f"""
            SELECT coalesce(relation, '{ALL}') AS relation, count(DISTINCT fact_id) AS facts, count(*) AS prompts,
                   count(*) FILTER (WHERE status = 'ok') AS ok, count(*) FILTER (WHERE {self.usable()}) AS usable,
                   count(*) FILTER (WHERE status = 'skipped') AS skipped, {self._known_counts()},
                   count(*) FILTER (WHERE status = 'error') AS error, sum(seconds) AS compute_seconds,
                   count(*) FILTER (WHERE status = 'ok') / nullif(sum(seconds), 0) AS ok_per_compute_second,
                   avg(gold_prob) FILTER (WHERE status = 'ok') AS mean_gold_prob
            FROM {self._source('prompts')}
            GROUP BY ROLLUP (relation)
            ORDER BY relation IS NULL DESC, relation""")

    def _known_counts(self) -> str:
        """SQL select items `probed` (prompts with the probe's verdict) and `known` (0 both for a
        run without a probe: none probed)."""
        if self.has_column("prompts", "known"):
            return "count(known) AS probed, count(*) FILTER (WHERE known) AS known"
        return "0::BIGINT AS probed, 0::BIGINT AS known"

    def skip_reasons(self) -> pd.DataFrame:
        return self._frame("skip_reasons", f"""
            SELECT status, coalesce(error, '(no reason given)') AS reason, count(*) AS n_prompts,
                   min(prompt_id) AS example_prompt_id
            FROM {self._source('prompts')} WHERE status <> 'ok'
            GROUP BY ALL ORDER BY n_prompts DESC, status, reason""")

    def has_edits(self) -> bool:
        return bool(self.run.parts("edits"))

    def edit_rows(self) -> pd.DataFrame:
        """The edits table's prompt rows (kn_ray.stages.edit.outcomes.EDITS)."""
        return self._con.execute(f"SELECT * FROM {self._source('edits')} WHERE prompt_id IS NOT NULL").df()

    def edit_summary(self) -> pd.DataFrame:
        """Suppress / amplify effects per op, condition and relation ('ALL' = overall); the edit
        stage's own summary (kn_ray.stages.edit.outcomes.scale_summary)."""
        if not self.has_edits():
            return pd.DataFrame(columns=SCALE_COLUMNS)
        return scale_summary(self._con, self._source("edits"))

    def edit_metrics(self) -> pd.DataFrame:
        """Update / erase: mean of each per-edit metric per op, condition and relation ('ALL' = overall)."""
        if not self.has_edits():
            return pd.DataFrame(columns=METRIC_COLUMNS)
        return metric_summary(self._con, self._source("edits"))

    def edit_criteria(self) -> pd.DataFrame:
        """Today's criteria per (op, condition, metric) with bootstrap CIs: OUT/edits.json."""
        rows = (self.run.summary("edit") or {}).get("criteria", []) if self.has_edits() else []
        frame = pd.DataFrame(rows, columns=["op", "condition", "metric", "n_edits", "mean", "ci_low", "ci_high",
                                            "too_few"])
        if len(frame):  # an edits.json from before `too_few`: the same rule, applied here
            few = frame.n_edits.fillna(0).astype(int) < MIN_UNITS
            frame["too_few"] = few
            frame[["ci_low", "ci_high"]] = frame[["ci_low", "ci_high"]].astype(float).where(~few)
        return frame

    def context(self) -> dict:
        """What the figures came from: model, corpus slice and aggregation thresholds."""
        stats = self.run_stats()
        total = stats[stats.relation == ALL].iloc[0] if len(stats) else None
        parameters = (self.run.summary("aggregate") or {}).get("parameters", {})
        config = self.run.config
        return {"model": config.model_label, "input": config.input_label or str(self.run).rsplit("/", 1)[-1],
                "relations": int(len(stats) - 1) if total is not None else 0,
                "facts": int(total.facts) if total is not None else 0,
                "usable_prompts": int(total.usable) if total is not None else 0, "parameters": parameters}

    # ---- what the model knows, levels, consistency ----------------------------------------------
    def probe_summary(self) -> dict | None:
        """probe.json (None for a run without a probe, e.g. one made before the probe stage)."""
        return self.run.summary("probe")

    def probe(self) -> pd.DataFrame | None:
        """Per relation from probe.json: prompts probed, known prompts and share, median P(gold),
        facts, known facts, facts chosen for attribution; None without a probe."""
        probe = self.probe_summary()
        if not probe:
            return None
        return pd.DataFrame(probe.get("relations", []), columns=COLUMNS["probe"])

    def levels(self) -> pd.DataFrame:
        """Per method and level (fact, relation, generic): distinct neurons, their (fact, neuron)
        rows and the facts with one (aggregate.json's counts; empty for an aggregation before levels)."""
        counts = (self.run.summary("aggregate") or {}).get("counts", {})
        rows = [dict(method=method, level=level, neurons=c["neurons_per_level"].get(level, 0),
                     knowledge_neuron_rows=c["knowledge_neurons_per_level"].get(level, 0),
                     facts=c["facts_per_level"].get(level, 0))
                for method, c in counts.items() if isinstance(c, dict) and "neurons_per_level" in c for level in LEVELS]
        return pd.DataFrame(rows, columns=COLUMNS["levels"])

    def generic_neurons(self, limit: int = 10, method: str = "ig") -> pd.DataFrame:
        """The generic neurons of a method that are knowledge neurons of the most facts."""
        if not self.run.parts("shared_neurons"):
            return pd.DataFrame(columns=COLUMNS["generic_neurons"])
        return self._frame("generic_neurons", f"""
            SELECT * FROM {self._source('shared_neurons')} WHERE level = 'generic' AND method = ?
            ORDER BY n_facts DESC, n_relations DESC, layer, neuron LIMIT ?""", [method, int(limit)])

    def consistency(self) -> pd.DataFrame:
        """Per method and relation (ALL: the run): facts with a consistency, its mean, quartiles
        (aggregate.json's `consistency`; empty for an aggregation before it)."""
        saved = (self.run.summary("aggregate") or {}).get("consistency", {})
        rows = [dict(method=method, relation=relation, **values)
                for method, per_relation in saved.items() for relation, values in per_relation.items()]
        return pd.DataFrame(rows, columns=COLUMNS["consistency"])

    def close(self) -> None:
        self._con.close()
