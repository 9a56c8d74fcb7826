"""The explorer's questions as DuckDB queries over one run's committed parts.

Every user value (fact id, relation, layer, neuron, search text, page) is a bound parameter;
the only SQL text built from a request is a sort column and direction picked from a fixed
table of names. Each page reads only the rows it shows: filters go down into DuckDB's Parquet
scan, lists are paged (LIMIT/OFFSET), and no query materialises a table of the run.

`RunQueries` extends the report's `Analytics` (same sources, same corpus numbers) with the
per-relation, per-fact and per-neuron views.
"""

from __future__ import annotations

import contextlib
import math
import threading
from dataclasses import dataclass, replace

import pandas as pd

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.aggregate.params import METHOD_NAMES, AggregateParams
from kn_ray.stages.duck import source
from kn_ray.stages.edit.criteria import CRITERIA, MIN_UNITS
from kn_ray.stages.report.analytics import ALL, Analytics

VIEW_RATIO = 0.1  # the fact view shows a prompt's neurons scoring >= this share of its max (either layout)
PAGE_SIZE = 50
CONDITIONS = ("kn", "activation", "random", "other_relation")
OPS = ("suppress", "amplify", "update", "erase")
Z95 = 1.959964  # normal quantile of a 95% interval
MEASURES = {"prompts": "prompts", "neurons": "neurons scaled or edited", "p_before": "mean P(gold) before",
            "p_after": "mean P(gold) after", "rel_change": "mean relative change of P(gold)",
            "top1_before": "top-1 correct before", "top1_after": "top-1 correct after", "new_object": "new object",
            "new_p_after": "P(new object) after"}  # fact_edits' measured rows; criteria keep their names


@dataclass(frozen=True)
class Page:
    """One page of a longer list: its rows, the total number of rows and where it starts."""

    rows: pd.DataFrame
    total: int
    page: int
    size: int

    @property
    def pages(self) -> int:
        return max(1, math.ceil(self.total / self.size))


@dataclass(frozen=True)
class Listing:
    """A list request: search text, sort key (one of the view's names), direction, page (1-based)."""

    q: str = ""
    sort: str = ""
    desc: bool = False
    page: int = 1

    def order(self, columns: dict[str, str], default: str) -> str:
        """ORDER BY text: a whitelisted column name, never request text."""
        column = columns.get(self.sort) or columns[default]
        return f"{column} {'DESC' if self.desc else 'ASC'} NULLS LAST"


class RunQueries(Analytics):
    """One snapshot of a run (the parts committed when it was opened)."""

    def __init__(self, run: RunDirectory, memory_limit: str = MEMORY_LIMIT):
        self._local = threading.local()  # this thread's cursor (local runs)
        self._cursors: list = []
        self._guard = threading.Lock()  # the cursor list, the cache's locks
        self._cache: dict = {}
        self._cache_locks: dict = {}
        super().__init__(run.uri, memory_limit)
        self.run = run
        # Local parts are read by SQL text alone, so each thread queries through a cursor of its own
        # (DuckDB: one cursor per thread is safe) and pages are served concurrently. A run elsewhere
        # is a pyarrow dataset registered on the main connection: its pages take turns (`serial`).
        self.serial = contextlib.nullcontext() if run.local else threading.Lock()
        self.record = run.config
        self.tables = {t: bool(run.parts(t)) for t in ("prompts", "neurons", "knowledge_neurons", "relation_neurons", "edits")}
        self.aggregate_summary = run.summary("aggregate") or {}

    # ---- connections and the snapshot's cache ------------------------------------------------
    @property
    def _con(self):
        """The DuckDB connection of this thread: its own cursor of the snapshot's database (local
        runs), else the main connection."""
        if not self.run.local:
            return self._main
        cursor = getattr(self._local, "cursor", None)
        if cursor is None:
            with self._guard:
                cursor = self._local.cursor = self._main.cursor()
                self._cursors.append(cursor)
        return cursor

    @_con.setter
    def _con(self, con) -> None:
        self._main = con

    def cached(self, key, compute):
        """`compute()` once per snapshot (its parts do not change): figures, overview numbers."""
        with self._guard:
            lock = self._cache_locks.setdefault(key, threading.Lock())
        with lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]

    def close(self) -> None:
        with self._guard:
            for cursor in self._cursors:
                cursor.close()
            self._cursors.clear()
        self._main.close()

    # ---- helpers ------------------------------------------------------------------------------
    def df(self, query: str, params: dict | None = None) -> pd.DataFrame:
        """A query's rows; `params` bind the query's `$name` placeholders."""
        return self._con.execute(query, params or {}).df()

    def has(self, table: str) -> bool:
        return self.tables.get(table, False)

    def src(self, table: str) -> str:
        return self._source(table)

    def raw_neurons(self) -> str:
        """`neurons` as stored (dense: one scores list per prompt and layer)."""
        if "neurons_raw" not in self._sources:
            self._sources["neurons_raw"] = source(self._con, self.run, "neurons", dense_rows=False)
        return self._sources["neurons_raw"]

    @property
    def dense(self) -> bool:
        return self.record.dense

    @property
    def params(self) -> AggregateParams:
        """The aggregation's parameters (the defaults before `kn-ray aggregate`)."""
        return AggregateParams.recorded(self.aggregate_summary)

    @property
    def t(self) -> float:
        """The coarse threshold the aggregation used."""
        return float(self.params.t)

    @property
    def shape(self) -> tuple[int | None, int | None]:
        info = self.record.lookup("model_info") or {}
        return info.get("num_layers"), info.get("num_neurons")

    def _empty(self, columns: str) -> str:
        """A relation with these columns and no rows (a table that does not exist yet)."""
        return f"(SELECT {columns} WHERE false)"

    def _kn(self) -> str:
        return self.src("knowledge_neurons") if self.has("knowledge_neurons") else self._empty(
            "NULL::VARCHAR AS fact_id, NULL::VARCHAR AS relation, NULL::SMALLINT AS layer, NULL::INTEGER AS neuron, "
            "NULL::INTEGER AS n_prompts, NULL::DOUBLE AS share, NULL::FLOAT AS mean_score, NULL::VARCHAR AS method")

    def _candidates(self) -> str:
        """Every knowledge neuron whatever its level: knowledge_neurons (the kept levels) with
        shared_neuron_facts (the others' (fact, neuron) rows), as (fact_id, relation, layer,
        neuron, share, method)."""
        columns = "fact_id, relation, layer, neuron, share, method"
        if not self.run.parts("shared_neuron_facts"):
            return f"(SELECT {columns} FROM {self._kn()})"
        return f"(SELECT {columns} FROM {self._kn()} UNION SELECT {columns} FROM {self.src('shared_neuron_facts')})"

    def _rn(self) -> str:
        return self.src("relation_neurons") if self.has("relation_neurons") else self._empty(
            "NULL::VARCHAR AS relation, NULL::SMALLINT AS layer, NULL::INTEGER AS neuron, NULL::INTEGER AS n_facts, "
            "NULL::DOUBLE AS share, NULL::VARCHAR AS method")

    def _fact_effects(self) -> str:
        """Per edited fact: mean relative change of P(gold) on its own prompts under its
        knowledge neurons (suppress, amplify) and the update's success rate."""
        if not self.has("edits"):
            return self._empty("NULL::VARCHAR AS fact_id, NULL::VARCHAR AS relation, NULL::DOUBLE AS suppress, "
                               "NULL::DOUBLE AS amplify, NULL::DOUBLE AS update_success")
        return f"""(SELECT fact_id, any_value(relation) AS relation,
                   avg(rel_change) FILTER (WHERE op = 'suppress' AND prompt_id IS NOT NULL) AS suppress,
                   avg(rel_change) FILTER (WHERE op = 'amplify' AND prompt_id IS NOT NULL) AS amplify,
                   avg(value) FILTER (WHERE op = 'update' AND metric = 'success_rate') AS update_success
            FROM {self.src('edits')}
            WHERE fact_id IS NOT NULL AND condition = 'kn' AND coalesce(scope, 'target') = 'target'
              AND (rel_change IS NULL OR NOT isnan(rel_change))
            GROUP BY fact_id)"""

    # ---- overview -----------------------------------------------------------------------------
    def neuron_rows(self) -> int:
        """Stored neuron rows (dense: rows x the layer width)."""
        rows = self.df(f"SELECT count(*) AS n FROM {self.raw_neurons()}").n.iloc[0] if self.has("neurons") else 0
        width = self.shape[1] if self.dense else 1
        return int(rows) * int(width or 1)

    def kn_per_layer(self) -> pd.DataFrame:
        return self.layer_histogram() if self.has("knowledge_neurons") else pd.DataFrame()

    # ---- relations ----------------------------------------------------------------------------
    RELATION_SORT = {"relation": "s.relation", "facts": "s.facts", "prompts": "s.prompts", "ok": "s.ok",
                     "known": "known_share",
                     "gold": "s.mean_gold_prob", "kn": "kn_per_fact", "relation_neurons": "relation_neurons",
                     "suppress": "suppress", "amplify": "amplify"}

    def relations(self, listing: Listing) -> pd.DataFrame:
        """Per relation: facts, prompts (usable: by the aggregation's rule; probed / known: the
        probe's verdicts, known_share their ratio), mean P(gold), knowledge neurons per fact, relation
        neurons, and the suppress / amplify effect of the facts' knowledge neurons: mean over
        edited facts of the per-fact mean relative change, with a 95% normal interval over facts
        (null over fewer than MIN_UNITS facts: too few for an interval)."""
        order = listing.order(self.RELATION_SORT, "relation")
        return self.df(f"""
            WITH s AS (SELECT relation, count(DISTINCT fact_id) AS facts, count(*) AS prompts,
                              count(*) FILTER (WHERE status = 'ok') AS ok,
                              count(*) FILTER (WHERE status = 'skipped') AS skipped,
                              count(*) FILTER (WHERE status = 'error') AS error,
                              avg(gold_prob) FILTER (WHERE status = 'ok') AS mean_gold_prob,
                              count(*) FILTER (WHERE {self.usable()}) AS usable,
                              count(DISTINCT fact_id) FILTER (WHERE {self.usable()}) AS usable_facts,
                              {self._known_counts()}
                       FROM {self.src('prompts')} GROUP BY relation),
                 k AS (SELECT relation, count(*) AS n_kn FROM {self._kn()} WHERE method = 'ig' GROUP BY relation),
                 r AS (SELECT relation, count(*) AS relation_neurons FROM {self._rn()} WHERE method = 'ig' GROUP BY relation),
                 e AS (SELECT relation, count(suppress) AS suppress_facts, avg(suppress) AS suppress,
                              CASE WHEN count(suppress) >= {MIN_UNITS}  -- fewer facts: too few for an interval
                                   THEN {Z95} * stddev_samp(suppress) / sqrt(count(suppress)) END AS suppress_ci,
                              count(amplify) AS amplify_facts, avg(amplify) AS amplify,
                              CASE WHEN count(amplify) >= {MIN_UNITS}
                                   THEN {Z95} * stddev_samp(amplify) / sqrt(count(amplify)) END AS amplify_ci
                       FROM {self._fact_effects()} GROUP BY relation)
            SELECT s.*, s.known / nullif(s.probed, 0) AS known_share, k.n_kn / nullif(s.usable_facts, 0) AS kn_per_fact,
                   r.relation_neurons,
                   e.suppress, e.suppress_ci, e.suppress_facts, e.amplify, e.amplify_ci, e.amplify_facts
            FROM s LEFT JOIN k USING (relation) LEFT JOIN r USING (relation) LEFT JOIN e USING (relation)
            WHERE $q = '' OR strpos(lower(s.relation), lower($q)) > 0
            ORDER BY {order}, s.relation""", {"q": listing.q})

    def relation_summary(self, relation: str) -> pd.DataFrame:
        """One row of `relations` (empty if the relation is unknown)."""
        frame = self.relations(Listing(q=relation))
        return frame[frame.relation == relation]

    def relation_neurons(self, relation: str) -> pd.DataFrame:
        return self.df(f"""SELECT layer, neuron, n_facts, share, method FROM {self._rn()}
                           WHERE relation = $relation ORDER BY method DESC, n_facts DESC, layer, neuron""",
                       {"relation": relation})

    def relation_erase(self, relation: str) -> pd.DataFrame:
        """The erase experiment of the relation: its metric rows per condition."""
        if not self.has("edits"):
            return pd.DataFrame(columns=["condition", "metric", "value"])
        return self.df(f"""SELECT condition, metric, avg(value) AS value FROM {self.src('edits')}
                           WHERE op = 'erase' AND relation = $relation AND metric IS NOT NULL
                           GROUP BY ALL ORDER BY metric, condition""", {"relation": relation})

    FACT_SORT = {"fact": "f.fact_id", "subject": "f.subject", "object": "f.object", "prompts": "f.prompts",
                 "gold": "f.mean_gold_prob", "kn": "n_kn", "suppress": "e.suppress", "amplify": "e.amplify",
                 "update": "e.update_success"}

    def facts(self, listing: Listing, relation: str | None = None, size: int = PAGE_SIZE) -> Page:
        """Facts (of one relation, or all) matching the search text in id, subject or object:
        prompts, mean P(gold), the most frequent top prediction, knowledge neurons, edit effects."""
        order = listing.order(self.FACT_SORT, "fact")
        page = max(1, listing.page)
        frame = self.df(f"""
            WITH f AS (SELECT fact_id, any_value(relation) AS relation, any_value(subject) AS subject,
                              any_value(object) AS object, count(*) AS prompts,
                              count(*) FILTER (WHERE status = 'ok') AS ok,
                              avg(gold_prob) FILTER (WHERE status = 'ok') AS mean_gold_prob,
                              mode(top_token) FILTER (WHERE status = 'ok') AS top_token
                       FROM {self.src('prompts')}
                       WHERE ($relation IS NULL OR relation = $relation) AND fact_id IS NOT NULL AND fact_id <> ''
                       GROUP BY fact_id),
                 k AS (SELECT fact_id, count(*) AS n_kn FROM {self._kn()}
                       WHERE method = 'ig' AND ($relation IS NULL OR relation = $relation) GROUP BY fact_id)
            SELECT f.*, coalesce(k.n_kn, 0) AS n_kn, e.suppress, e.amplify, e.update_success,
                   count(*) OVER () AS total
            FROM f LEFT JOIN k USING (fact_id) LEFT JOIN {self._fact_effects()} e USING (fact_id)
            WHERE $q = '' OR strpos(lower(f.fact_id), lower($q)) > 0 OR strpos(lower(f.subject), lower($q)) > 0
                  OR strpos(lower(f.object), lower($q)) > 0
            ORDER BY {order}, f.fact_id LIMIT $limit OFFSET $offset""",
            {"relation": relation, "q": listing.q, "limit": size, "offset": (page - 1) * size})
        total = int(frame.total.iloc[0]) if len(frame) else self._count_facts(listing, relation) if page > 1 else 0
        return Page(frame.drop(columns="total"), total, page, size)

    def _count_facts(self, listing: Listing, relation: str | None) -> int:
        """The total of a request paged past its end."""
        return self.facts(replace(listing, page=1), relation, 1).total

    # ---- one fact -----------------------------------------------------------------------------
    def fact(self, fact_id: str) -> dict | None:
        """The fact: prompts, `ok` (its usable prompts, by the aggregation's rule), probed and known
        prompts, and its consistency (ig: `jaccard` over `n_pairs` pairs of usable prompts; null
        without fact_consistency or below 2 usable prompts)."""
        frame = self.df(f"""SELECT fact_id, any_value(relation) AS relation, any_value(subject) AS subject,
                                   any_value(object) AS object, count(*) AS prompts,
                                   count(*) FILTER (WHERE {self.usable()}) AS ok, {self._known_counts()}
                            FROM {self.src('prompts')} WHERE fact_id = $fact GROUP BY fact_id""", {"fact": fact_id})
        if not len(frame):
            return None
        fact = frame.iloc[0].to_dict()
        fact.update(self.fact_consistency(fact_id))
        return fact

    def fact_consistency(self, fact_id: str) -> dict:
        """{jaccard, n_pairs, consistency_prompts} of the fact (ig) from fact_consistency; None
        values without the table or a row."""
        empty = {"jaccard": None, "n_pairs": None, "consistency_prompts": None}
        if not self.run.parts("fact_consistency"):
            return empty
        frame = self.df(f"""SELECT jaccard, n_pairs, n_prompts AS consistency_prompts
                            FROM {self.src('fact_consistency')} WHERE fact_id = $fact AND method = 'ig'""",
                        {"fact": fact_id})
        return {k: (None if pd.isna(v) else v) for k, v in frame.iloc[0].to_dict().items()} if len(frame) else empty

    def fact_prompts(self, fact_id: str) -> pd.DataFrame:
        """The fact's prompts with the probe's gold_rank and known (null for a run without a
        probe) and `usable` (the aggregation's rule)."""
        probe = ("gold_rank, known" if self.has_column("prompts", "known") else
                 "NULL::INTEGER AS gold_rank, NULL::BOOLEAN AS known")
        return self.df(f"""SELECT prompt_id, template, prompt, target, status, error, gold_prob, {probe}, top_token,
                                  top_prob, max_score, {self.usable()} AS usable
                           FROM {self.src('prompts')} WHERE fact_id = $fact ORDER BY prompt_id""", {"fact": fact_id})

    def fact_scores(self, fact_id: str) -> pd.DataFrame:
        """The fact's (prompt, layer, neuron, score) rows scoring >= VIEW_RATIO x the prompt's max,
        with `rel` = score / max and `coarse` = score >= t x max (the aggregation's rule)."""
        if self.dense:
            rows = f"""(SELECT prompt_id, layer, CAST(unnest(range(len(scores))) AS INTEGER) AS neuron,
                               CAST(unnest(scores) AS FLOAT) AS score
                        FROM {self.raw_neurons()} WHERE fact_id = $fact)"""
        else:
            rows = f"(SELECT prompt_id, layer, neuron, score FROM {self.raw_neurons()} WHERE fact_id = $fact)"
        return self.df(f"""
            SELECT n.prompt_id, n.layer, n.neuron, n.score, n.score / p.max_score AS rel,
                   {self.params.coarse("ig", "n.score", "p.max_score")} AS coarse
            FROM {rows} n JOIN (SELECT prompt_id, max_score FROM {self.src('prompts')}
                                WHERE fact_id = $fact AND {self.usable()} AND max_score > 0) p USING (prompt_id)
            WHERE n.score > 0 AND n.score >= $view * p.max_score
            ORDER BY n.prompt_id, n.layer, n.neuron""", {"fact": fact_id, "view": min(VIEW_RATIO, self.t)})

    def fact_knowledge_neurons(self, fact_id: str) -> pd.DataFrame:
        return self.df(f"""SELECT method, layer, neuron, n_prompts, share, mean_score FROM {self._kn()}
                           WHERE fact_id = $fact ORDER BY method DESC, layer, neuron""", {"fact": fact_id})

    def fact_neurons(self, fact_id: str, scores: pd.DataFrame | None = None,
                     kn: pd.DataFrame | None = None) -> pd.DataFrame:
        """Per (layer, neuron) of the fact's view: prompts where it is coarse, mean score and
        relative score over the prompts showing it, and whether it is a knowledge neuron (ig,
        activation). Knowledge neurons first, then by coarse prompts."""
        scores = self.fact_scores(fact_id) if scores is None else scores
        kn = self.fact_knowledge_neurons(fact_id) if kn is None else kn
        per = scores.groupby(["layer", "neuron"]).agg(coarse_prompts=("coarse", "sum"), shown_prompts=("score", "size"),
                                                      mean_score=("score", "mean"), mean_rel=("rel", "mean"))
        per = per.reset_index()
        for method in METHOD_NAMES:
            keys = kn[kn.method == method][["layer", "neuron"]].assign(**{f"kn_{method}": True})
            per = per.merge(keys, on=["layer", "neuron"], how="outer")
        for method in METHOD_NAMES:
            per[f"kn_{method}"] = per[f"kn_{method}"].astype("boolean").fillna(False).astype(bool)
        per[["coarse_prompts", "shown_prompts"]] = per[["coarse_prompts", "shown_prompts"]].fillna(0).astype(int)
        per = per[(per.coarse_prompts > 0) | per.kn_ig | per.kn_activation]
        return per.sort_values(["kn_ig", "coarse_prompts", "mean_rel"], ascending=False, ignore_index=True)

    def fact_edits(self, fact_id: str) -> dict[str, pd.DataFrame]:
        """Per op, a column per condition and a row per measure: the fact's prompts (their mean P(gold) before and
        after, mean relative change; `other_relation`: the control prompts), and each per-edit
        criterion `kn-ray edit` computed for the fact. Erase edits the fact's relation: its
        rows are the fact's prompts under the relation's erase."""
        if not self.has("edits"):
            return {}
        edits = self.src("edits")
        measured = self.df(f"""
            SELECT op, condition, count(*) AS prompts, any_value(n_neurons) AS neurons,
                   avg(prob_before) AS p_before, avg(prob_after) AS p_after,
                   avg(rel_change) FILTER (WHERE NOT isnan(rel_change)) AS rel_change,
                   avg(correct_before::INTEGER) AS top1_before, avg(correct_after::INTEGER) AS top1_after,
                   any_value(new_object) AS new_object, avg(new_prob_after) AS new_p_after
            FROM {edits}
            WHERE prompt_id IS NOT NULL AND (coalesce(scope, 'target') = 'target' OR condition = 'other_relation')
              AND (fact_id = $fact OR op = 'erase' AND prompt_id IN (SELECT prompt_id FROM {self.src('prompts')}
                                                                      WHERE fact_id = $fact))
            GROUP BY op, condition""", {"fact": fact_id})
        metrics = self.df(f"""SELECT op, condition, metric, avg(value) AS value FROM {edits}
                              WHERE fact_id = $fact AND metric IS NOT NULL GROUP BY ALL""", {"fact": fact_id})
        out = {}
        for op in OPS:
            rows = measured[measured.op == op].drop(columns="op").set_index("condition")
            wide = metrics[metrics.op == op].pivot_table(index="condition", columns="metric", values="value",
                                                         aggfunc="first")
            if rows.empty and wide.empty:
                continue
            order = [c for c in CRITERIA if c in wide] + sorted(c for c in wide if c not in CRITERIA)
            table = rows.join(wide[order], how="outer") if len(rows) else wide[order]
            present = list(table.index)
            table = table.reindex([c for c in CONDITIONS if c in present] + sorted(set(present) - set(CONDITIONS)))
            table = table.dropna(axis=1, how="all").astype(object).T  # a row per measure, a column per condition
            out[op] = table.rename_axis("measure").reset_index().rename_axis(None, axis=1)
        return out

    # ---- one neuron ---------------------------------------------------------------------------
    def neuron_in_range(self, layer: int, neuron: int) -> bool:
        layers, width = self.shape
        return 0 <= layer < (layers or 2 ** 15) and 0 <= neuron < (width or 2 ** 31)

    def neuron_facts(self, layer: int, neuron: int) -> pd.DataFrame:
        """Every fact where (layer, neuron) is a knowledge neuron (ig or activation, at any level:
        knowledge_neurons with shared_neuron_facts) or a coarse neuron of a usable prompt: its prompts where coarse, the mean score and mean share of
        the prompt's max over the prompts that stored it; by relation, knowledge neurons first."""
        if self.dense:
            rows = f"""(SELECT prompt_id, fact_id, CAST(list_extract(scores, $neuron + 1) AS FLOAT) AS score
                        FROM {self.raw_neurons()} WHERE layer = $layer)"""
        else:
            rows = f"(SELECT prompt_id, fact_id, score FROM {self.raw_neurons()} WHERE layer = $layer AND neuron = $neuron)"
        return self.df(f"""
            WITH hits AS (SELECT n.fact_id,
                                 count(*) FILTER (WHERE {self.params.coarse("ig", "n.score", "p.max_score")}) AS coarse_prompts,
                                 avg(n.score) AS mean_score, avg(n.score / p.max_score) AS mean_rel
                          FROM {rows} n JOIN {self.src('prompts')} p USING (prompt_id)
                          WHERE {self.usable("p")} AND p.max_score > 0 AND n.score > 0 AND n.score >= $view * p.max_score
                          GROUP BY n.fact_id),
                 kn AS (SELECT fact_id, bool_or(method = 'ig') AS kn_ig, bool_or(method = 'activation') AS kn_activation,
                               max(share) FILTER (WHERE method = 'ig') AS kn_share
                        FROM {self._candidates()} WHERE layer = $layer AND neuron = $neuron GROUP BY fact_id),
                 found AS (SELECT fact_id FROM hits WHERE coarse_prompts > 0 UNION SELECT fact_id FROM kn),
                 info AS (SELECT fact_id, any_value(relation) AS relation, any_value(subject) AS subject,
                                 any_value(object) AS object, count(*) FILTER (WHERE {self.usable()}) AS usable_prompts
                          FROM {self.src('prompts')} WHERE fact_id IN (SELECT fact_id FROM found) GROUP BY fact_id)
            SELECT i.relation, i.fact_id, i.subject, i.object, i.usable_prompts,
                   coalesce(h.coarse_prompts, 0) AS coarse_prompts, h.mean_score, h.mean_rel,
                   coalesce(k.kn_ig, false) AS kn_ig, coalesce(k.kn_activation, false) AS kn_activation, k.kn_share
            FROM found JOIN info i USING (fact_id) LEFT JOIN hits h USING (fact_id) LEFT JOIN kn k USING (fact_id)
            ORDER BY i.relation, kn_ig DESC, coarse_prompts DESC, i.fact_id""",
            {"layer": layer, "neuron": neuron, "view": min(VIEW_RATIO, self.t)})

    def neuron_level(self, layer: int, neuron: int) -> list[dict]:
        """The neuron's level per method where it is relation-level or generic (shared_neurons:
        level, n_facts, n_relations, relations); [] otherwise (fact level, or no knowledge neuron)."""
        if not self.run.parts("shared_neurons"):
            return []
        frame = self.df(f"""SELECT method, level, n_facts, n_relations, relations, share FROM {self.src('shared_neurons')}
                            WHERE layer = $layer AND neuron = $neuron ORDER BY method DESC""",
                        {"layer": layer, "neuron": neuron})
        return [dict(row, relations=list(row["relations"])) for row in frame.to_dict("records")]

    def neuron_relations(self, layer: int, neuron: int) -> pd.DataFrame:
        return self.df(f"""SELECT relation, n_facts, share, method FROM {self._rn()}
                           WHERE layer = $layer AND neuron = $neuron ORDER BY method DESC, n_facts DESC""",
                       {"layer": layer, "neuron": neuron})

    @staticmethod
    def by_relation(facts: pd.DataFrame) -> pd.DataFrame:
        """Per relation of a neuron's facts: how many hold it as a knowledge / coarse neuron."""
        if facts.empty:
            return pd.DataFrame(columns=["relation", "facts", "kn_ig", "kn_activation", "coarse", "mean_score"])
        return facts.groupby("relation").agg(
            facts=("fact_id", "size"), kn_ig=("kn_ig", "sum"), kn_activation=("kn_activation", "sum"),
            coarse=("coarse_prompts", lambda c: int((c > 0).sum())), mean_score=("mean_score", "mean"),
        ).reset_index().sort_values(["kn_ig", "coarse"], ascending=False, ignore_index=True)


def overall(frame: pd.DataFrame) -> pd.DataFrame:
    """The ALL rows of a summary."""
    return frame[frame.relation == ALL] if len(frame) else frame
