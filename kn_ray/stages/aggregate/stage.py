"""Knowledge neurons per fact and per relation from the stored attribution rows.

Follows the authors' `2_get_kn.py` (Dai et al., ACL 2022):

* coarse neurons of a prompt: score >= t x the prompt's max score (t = 0.2);
* knowledge neurons of a fact: coarse neurons of at least max(p x n, 3) of the fact's n
  usable prompts (p = 0.7; `count >= p * n` with no rounding, so p is a plain share);
* adaptive p (optional): per relation, p moves by 0.05 (up if the mean number of knowledge
  neurons per fact exceeds 5, down if below 2), at most 6 evaluations;
* relation neurons: knowledge neurons of at least 10% of the relation's facts;
* the activation baseline repeats all of it on raw activations with t = 0.5.

Beyond the paper, over the whole run (docs/downstream.md, rules 6 and 7):

* the level of each knowledge neuron: generic (a knowledge neuron of facts of several
  relations, or of a large share of the run's facts), relation (of several facts, one
  relation) or fact (of its fact only); knowledge_neurons keeps the fact-level ones by
  default, shared_neurons lists the others;
* each fact's consistency: the mean pairwise Jaccard of its usable prompts' coarse-neuron sets
  (fact_consistency).

A prompt is usable when its status is 'ok' and the model knows the fact (`prompts.known`, the
probe's verdict; null or absent counts as known), unless --include-unknown.

Everything runs as DuckDB SQL over the Parquet parts with a memory limit, so group-bys
spill to disk instead of holding the rows in memory.
"""

from __future__ import annotations

import time
from dataclasses import asdict

import duckdb
import pandas as pd

from kn_ray.stages.aggregate.params import EPS, LEVELS, METHODS, AggregateParams, Method, has_column
from kn_ray.stages.aggregate.schemas import (CIRCUIT_NEURONS, FACT_CONSISTENCY, KNOWLEDGE_NEURONS, RELATION_CIRCUITS,
                                             RELATION_NEURONS, SHARED_NEURON_FACTS, SHARED_NEURONS)
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import KINDS as ATTRIBUTE_TABLES
from kn_ray.stages.duck import connect, source, write_query

ADAPTIVE_STEP = 0.05
ADAPTIVE_EVALUATIONS = 6
ADAPTIVE_TARGET = (2.0, 5.0)  # mean knowledge neurons per fact the authors aimed for


def aggregate(out, params: AggregateParams | None = None) -> dict:
    """Write knowledge_neurons/, relation_neurons/, shared_neurons/, fact_consistency/ and their
    summary under `out`; returns the summary."""
    params = params or AggregateParams()
    run = RunDirectory(out).require()
    if run.parts("edges"):
        return aggregate_circuits(run, params)
    for required in ("prompts", "neurons"):
        run.parts(required, required=True)  # fails early, naming the missing folder
    methods = [m for m in METHODS if m.name in params.methods and (m.name == "ig" or run.parts(m.table))]
    params.validate(run)
    started = time.perf_counter()
    try:
        with run.scratch("aggregate-spill") as temp_dir, connect(params.memory_limit, params.threads, temp_dir) as con:
            summary = _aggregate(con, run, methods, params, temp_dir)
    except duckdb.OutOfMemoryException as error:
        reason = str(error).splitlines()[0]
        raise MemoryError(f"memory limit {params.memory_limit} is too small for this run, raise it ({reason})") from None
    summary["seconds"] = round(time.perf_counter() - started, 3)
    run.write_summary("aggregate", summary)
    return summary


def aggregate_circuits(run: RunDirectory, params: AggregateParams) -> dict:
    """A circuits run: relation circuits, the edges in the circuits (top `circuit_top` edges by
    |score| of a prompt) of at least `circuit_share` of a relation's facts; with `neuron_run`,
    the link to the knowledge neurons (`circuit_neurons`)."""
    started = time.perf_counter()
    with run.scratch("aggregate-spill") as temp_dir, connect(params.memory_limit, params.threads, temp_dir) as con:
        edges = source(con, run, "edges", local_dir=temp_dir)
        con.execute(f"CREATE TEMP TABLE circuits AS SELECT * FROM {edges} WHERE rank < {int(params.circuit_top)}")
        con.execute("CREATE TEMP TABLE circuit_facts AS SELECT relation, count(DISTINCT fact_id) AS n "
                    "FROM circuits GROUP BY relation")
        query = (f"SELECT e.relation, e.sender, e.receiver, count(DISTINCT e.fact_id) AS n_facts, "
                 f"count(DISTINCT e.fact_id) / any_value(c.n) AS share, avg(e.score) AS mean_score "
                 f"FROM circuits e JOIN circuit_facts c USING (relation) GROUP BY e.relation, e.sender, e.receiver "
                 f"HAVING count(DISTINCT e.fact_id) >= CAST({float(params.circuit_share)!r} AS DOUBLE) * any_value(c.n) "
                 f"- {EPS} ORDER BY e.relation, n_facts DESC, e.sender, e.receiver")
        with run.staged("relation_circuits") as tmp:
            rows = write_query(con, query, RELATION_CIRCUITS, tmp)
        facts = dict(con.execute("SELECT relation, n FROM circuit_facts ORDER BY relation").fetchall())
        counts = {"relation_circuit_edges": rows, "facts_with_a_circuit": facts}
        if params.neuron_run:
            counts["circuit_neurons"] = _link_knowledge_neurons(con, run, params.neuron_run, temp_dir)
    summary = {"parameters": {"circuit_share": params.circuit_share, "circuit_top": params.circuit_top,
                              "neuron_run": params.neuron_run},
               "counts": counts, "seconds": round(time.perf_counter() - started, 3)}
    run.write_summary("aggregate", summary)
    return summary


def _link_knowledge_neurons(con, run: RunDirectory, neuron_run: str, scratch) -> dict:
    """`circuit_neurons`: for each fact, each layer holding its knowledge neurons (ig, from the
    aggregated neuron run) and each node whose edge into that layer's MLP is in the fact's
    circuit (temp table `circuits`): which heads and MLPs write into the knowledge-neuron layers."""
    neurons = RunDirectory(neuron_run).require()
    if not neurons.parts("knowledge_neurons"):
        raise ValueError(f"--neuron-run {neuron_run}: no knowledge_neurons; run `kn-ray aggregate {neuron_run}` first")
    kn = source(con, neurons, "knowledge_neurons", local_dir=scratch)
    con.execute(f"CREATE TEMP TABLE kn_layers AS SELECT fact_id, layer, count(*) AS n_neurons FROM {kn} "
                f"WHERE method = 'ig' GROUP BY fact_id, layer")
    query = """
        SELECT e.fact_id, any_value(e.relation) AS relation, k.layer, any_value(k.n_neurons) AS n_neurons,
               e.sender, count(DISTINCT e.prompt_id) AS n_prompts, avg(e.score) AS mean_score
        FROM circuits e JOIN kn_layers k ON e.fact_id = k.fact_id AND e.receiver = 'm' || k.layer
        GROUP BY e.fact_id, k.layer, e.sender
        ORDER BY relation, e.fact_id, k.layer, abs(avg(e.score)) DESC, e.sender"""
    with run.staged("circuit_neurons") as tmp:
        rows = write_query(con, query, CIRCUIT_NEURONS, tmp)
    linked, with_kn = con.execute("SELECT count(DISTINCT c.fact_id) FILTER (WHERE k.fact_id IS NOT NULL), "
                                  "count(DISTINCT c.fact_id) FROM circuits c LEFT JOIN kn_layers k USING (fact_id)").fetchall()[0]
    return {"rows": rows, "facts_with_knowledge_neurons": linked, "facts_with_a_circuit": with_kn}


def _aggregate(con, run: RunDirectory, methods: list[Method], params: AggregateParams, scratch) -> dict:
    """`scratch`: local space; parts on an object store are copied there for DuckDB's reader."""
    _load_facts(con, run, params, scratch)
    summary = {"parameters": _parameters(run, methods, params), "p_per_relation": {}, "counts": _fact_counts(con, params)}
    summary["counts"]["parts_of_unfinished_shards"] = {t: run.unmarked_parts(t) for t in ATTRIBUTE_TABLES}
    kn_queries = []
    for method in methods:
        summary["counts"][method.name] = _load_candidates(con, run, method, params, scratch)
        chosen = choose_p(con, method.name, params)
        summary["p_per_relation"][method.name] = chosen
        con.register(f"p_{method.name}", pd.DataFrame({"relation": list(chosen), "p": [c["p"] for c in chosen.values()]}))
        kn_queries.append(_knowledge_neurons_sql(method.name, params))
        query = _consistency_sql(con, method.name)
        con.execute(f"INSERT INTO consistency {query}" if method is not methods[0] else
                    f"CREATE TEMP TABLE consistency AS {query}")  # one method at a time: within the memory limit
    con.execute("CREATE TEMP TABLE kn AS " + " UNION ALL ".join(kn_queries))  # every level: the candidates
    con.execute("CREATE TEMP TABLE neuron_levels AS " + _levels_sql(params))
    kept = ", ".join(f"'{level}'" for level in params.levels)
    with run.staged("knowledge_neurons") as tmp:
        write_query(con, f"SELECT k.*, l.level FROM kn k JOIN neuron_levels l USING (method, layer, neuron) "
                         f"WHERE l.level IN ({kept}) ORDER BY method, relation, fact_id, layer, neuron",
                    KNOWLEDGE_NEURONS, tmp)
    with run.staged("relation_neurons") as tmp:
        write_query(con, _relation_neurons_sql(params), RELATION_NEURONS, tmp)
    with run.staged("shared_neurons") as tmp:
        write_query(con, "SELECT * FROM neuron_levels WHERE level <> 'fact' ORDER BY method, level, n_facts DESC, "
                         "layer, neuron", SHARED_NEURONS, tmp)
    with run.staged("shared_neuron_facts") as tmp:
        write_query(con, "SELECT k.*, l.level FROM kn k JOIN neuron_levels l USING (method, layer, neuron) "
                         "WHERE l.level <> 'fact' ORDER BY method, relation, fact_id, layer, neuron",
                    SHARED_NEURON_FACTS, tmp)
    with run.staged("fact_consistency") as tmp:
        write_query(con, "SELECT * FROM consistency ORDER BY method, relation, fact_id", FACT_CONSISTENCY, tmp)
    for method in methods:
        summary["counts"][method.name].update(_output_counts(con, method.name, params))
    summary["consistency"] = {m.name: _consistency_summary(con, m.name) for m in methods}
    note = _levels_note(con, params)
    if note:
        summary["levels_note"] = note
    return summary


def _parameters(run: RunDirectory, methods: list[Method], params: AggregateParams) -> dict:
    chosen = {k: v for k, v in asdict(params).items() if k not in ("memory_limit", "threads", "methods")}
    return {**chosen, "methods": [m.name for m in methods],
            "keep_ratio": {m.name: run.config.keep_ratio(m.name) for m in methods},
            "adaptive_step": ADAPTIVE_STEP, "adaptive_evaluations": ADAPTIVE_EVALUATIONS,
            "adaptive_target": list(ADAPTIVE_TARGET)}


def _load_facts(con, run: RunDirectory, params: AggregateParams, scratch) -> None:
    """Usable prompts (status 'ok', known unless --include-unknown), facts with their usable
    prompt count, relations with their fact count; `unknown` holds the ok prompts left out."""
    prompts = source(con, run, "prompts", union_by_name=True, local_dir=scratch)  # older parts lack `known`
    duplicated = con.execute(f"SELECT count(*) - count(DISTINCT prompt_id) FROM {prompts}").fetchall()[0][0]
    if duplicated:
        raise ValueError(f"{run.location('prompts')}: {duplicated} repeated prompt_id rows (a shard written twice?)")
    known = has_column(con, prompts, "known")
    con.execute(f"CREATE TEMP TABLE usable AS SELECT prompt_id, fact_id, relation FROM {prompts} "
                f"WHERE {params.usable(known)}")
    con.execute(f"CREATE TEMP TABLE unknown AS SELECT prompt_id, fact_id FROM {prompts} "
                f"WHERE status = 'ok' AND {'known = false' if known else 'false'}")
    con.execute("CREATE TEMP TABLE facts AS SELECT fact_id, any_value(relation) AS relation, count(*) AS n_usable "
                "FROM usable GROUP BY fact_id")
    con.execute("CREATE TEMP TABLE relations AS SELECT relation, count(*) AS n_facts FROM facts GROUP BY relation")


def _fact_counts(con, params: AggregateParams) -> dict:
    row = con.execute("SELECT (SELECT count(*) FROM usable), count(*), count(*) FILTER (WHERE n_usable < ?), "
                      "count(DISTINCT relation), (SELECT count(*) FROM unknown), "
                      "(SELECT count(DISTINCT fact_id) FROM unknown) FROM facts", [params.min_prompts]).fetchall()[0]
    counts = dict(zip(["usable_prompts", "facts", "facts_below_min_prompts", "relations", "unknown_prompts",
                       "facts_with_unknown_prompts"], row))
    counts["unknown_prompts_usable"] = params.include_unknown  # whether those count as usable (--include-unknown)
    return counts


def _load_candidates(con, run: RunDirectory, method: Method, params: AggregateParams, scratch) -> dict:
    """coarse_<method>: every coarse (usable prompt, neuron); size_<method>: their number per
    usable prompt (0 without rows); cand_<method>: per (fact, neuron),
    the usable prompts where it was coarse and its mean value there, kept only if that count
    reaches min_prompts (no p can admit the others)."""
    rows = source(con, run, method.table, local_dir=scratch)
    con.execute(f"CREATE TEMP TABLE max_{method.name} AS SELECT r.prompt_id, max(r.{method.column}) AS top "
                f"FROM {rows} r SEMI JOIN usable u ON r.prompt_id = u.prompt_id GROUP BY r.prompt_id")
    con.execute(f"""
        CREATE TEMP TABLE coarse_{method.name} AS
        SELECT r.prompt_id, r.fact_id, r.layer, r.neuron, r.{method.column} AS value
        FROM {rows} r JOIN max_{method.name} m ON r.prompt_id = m.prompt_id
        WHERE {params.coarse(method.name, f"r.{method.column}", "m.top")}""")
    con.execute(f"CREATE TEMP TABLE size_{method.name} AS SELECT u.prompt_id, count(c.prompt_id) AS n "
                f"FROM usable u LEFT JOIN coarse_{method.name} c ON u.prompt_id = c.prompt_id GROUP BY u.prompt_id")
    con.execute(f"""
        CREATE TEMP TABLE cand_{method.name} AS
        SELECT fact_id, layer, neuron, count(*) AS n_prompts, avg(value) AS mean_value
        FROM coarse_{method.name} GROUP BY fact_id, layer, neuron
        HAVING count(*) >= ?""", [params.min_prompts])
    missing = con.execute(f"SELECT (SELECT count(*) FROM usable) - (SELECT count(*) FROM max_{method.name})").fetchall()[0][0]
    return {"usable_prompts_without_rows": missing}


def _knowledge_neurons_sql(method: str, params: AggregateParams) -> str:
    """Candidates reaching p x the fact's usable prompts, p taken per relation from table p_<method>."""
    return f"""
        SELECT c.fact_id, f.relation, c.layer, c.neuron, c.n_prompts, c.n_prompts / f.n_usable AS share,
               c.mean_value AS mean_score, '{method}' AS method
        FROM cand_{method} c JOIN facts f ON c.fact_id = f.fact_id JOIN p_{method} p ON f.relation = p.relation
        WHERE {params.knowledge("c.n_prompts", "f.n_usable", p="p.p")}"""


def _mean_per_fact(con, method: str, params: AggregateParams, p: dict[str, float]) -> dict[str, float]:
    """Mean knowledge neurons per fact of each relation under per-relation p (facts with a usable prompt)."""
    con.register(f"p_{method}", pd.DataFrame({"relation": list(p), "p": list(p.values())}))
    rows = con.execute(f"""
        SELECT r.relation, coalesce(k.n, 0) / r.n_facts
        FROM relations r LEFT JOIN (SELECT relation, count(*) AS n FROM ({_knowledge_neurons_sql(method, params)}) GROUP BY relation) k
        ON r.relation = k.relation""").fetchall()
    return dict(rows)


def choose_p(con, method: str, params: AggregateParams) -> dict[str, dict]:
    """p per relation: params.p, or with --adaptive the authors' search (see module docstring)."""
    relations = [r for (r,) in con.execute("SELECT relation FROM relations ORDER BY relation").fetchall()]
    p = {relation: params.p for relation in relations}
    chosen: dict[str, dict] = {}
    for evaluation in range(1, (ADAPTIVE_EVALUATIONS if params.adaptive else 1) + 1):
        means = _mean_per_fact(con, method, params, p)
        for relation in [r for r in relations if r not in chosen]:
            step = _adaptive_step(means[relation])
            next_p = round(p[relation] + step, 6)
            if not params.adaptive or step == 0 or evaluation == ADAPTIVE_EVALUATIONS or not 0 < next_p <= 1:
                chosen[relation] = {"p": p[relation], "mean_per_fact": means[relation], "evaluations": evaluation,
                                    "in_target": step == 0}
            else:
                p[relation] = next_p
    return {relation: chosen[relation] for relation in relations}


def _adaptive_step(mean_per_fact: float) -> float:
    low, high = ADAPTIVE_TARGET
    return ADAPTIVE_STEP if mean_per_fact > high else -ADAPTIVE_STEP if mean_per_fact < low else 0.0


def _relation_neurons_sql(params: AggregateParams) -> str:
    return f"""
        SELECT k.relation, k.layer, k.neuron, count(*) AS n_facts, count(*) / any_value(r.n_facts) AS share, k.method
        FROM kn k JOIN relations r ON k.relation = r.relation
        GROUP BY k.method, k.relation, k.layer, k.neuron
        HAVING count(*) >= {params.relation_share} * any_value(r.n_facts) - {EPS}
        ORDER BY k.method, k.relation, k.layer, k.neuron"""


def _levels_sql(params: AggregateParams) -> str:
    """Per (method, neuron) with a knowledge-neuron row: its facts, relations and level."""
    return f"""
        SELECT method, layer, neuron, {params.level("n_facts", "n_relations", "(SELECT count(*) FROM facts)")} AS level,
               n_facts, n_relations, relations, n_facts / (SELECT count(*) FROM facts) AS share, mean_score
        FROM (SELECT method, layer, neuron, count(DISTINCT fact_id) AS n_facts, count(DISTINCT relation) AS n_relations,
                     list(DISTINCT relation ORDER BY relation) AS relations, avg(mean_score) AS mean_score
              FROM kn GROUP BY method, layer, neuron)"""


def _consistency_sql(con, method: str) -> str:
    """Per fact with a usable prompt: the mean over pairs of its usable prompts of |A n B| / |A u B|,
    A and B their coarse-neuron sets (coarse_<method>). A prompt without coarse neurons has the
    empty set; a pair of two empty sets has no Jaccard (left out of the mean and of n_pairs).
    The pairs of a fact's usable prompts (prompt_pairs) and |A n B| of the pairs sharing a neuron
    (inter_<method>) are materialised first: inlined, DuckDB 2.0.1 ran the query past a 64 MB
    limit on a synthetic run of 2,700 prompts (tests/test_aggregate.py)."""
    con.execute("CREATE TEMP TABLE IF NOT EXISTS prompt_pairs AS SELECT a.fact_id, a.prompt_id AS pa, b.prompt_id AS pb "
                "FROM usable a JOIN usable b ON a.fact_id = b.fact_id AND a.prompt_id < b.prompt_id")
    con.execute(f"""
        CREATE TEMP TABLE inter_{method} AS
        SELECT a.prompt_id AS pa, b.prompt_id AS pb, count(*) AS n
        FROM coarse_{method} a JOIN coarse_{method} b
             ON a.fact_id = b.fact_id AND a.layer = b.layer AND a.neuron = b.neuron AND a.prompt_id < b.prompt_id
        GROUP BY a.prompt_id, b.prompt_id""")
    return f"""
        SELECT '{method}' AS method, f.fact_id, f.relation, f.n_usable AS n_prompts,
               coalesce(j.n_pairs, 0) AS n_pairs, CASE WHEN f.n_usable >= 2 THEN j.jaccard END AS jaccard
        FROM facts f LEFT JOIN (
            SELECT p.fact_id, count(*) AS n_pairs, avg(coalesce(i.n, 0) / (sa.n + sb.n - coalesce(i.n, 0))) AS jaccard
            FROM prompt_pairs p
            JOIN size_{method} sa ON sa.prompt_id = p.pa JOIN size_{method} sb ON sb.prompt_id = p.pb
            LEFT JOIN inter_{method} i ON i.pa = p.pa AND i.pb = p.pb
            WHERE sa.n + sb.n > 0
            GROUP BY p.fact_id) j ON f.fact_id = j.fact_id"""


def _consistency_summary(con, method: str) -> dict:
    """Per relation (and ALL, the run): facts with a consistency, its mean, median and quartiles."""
    rows = con.execute("""
        SELECT coalesce(relation, 'ALL'), count(jaccard), avg(jaccard), quantile_cont(jaccard, [0.25, 0.5, 0.75])
        FROM consistency WHERE method = ? GROUP BY ROLLUP (relation) ORDER BY relation NULLS FIRST""",
                       [method]).fetchall()
    keys = ["facts", "mean", "q1", "median", "q3"]
    return {r: dict(zip(keys, [n, mean, *(quartiles or [None] * 3)])) for r, n, mean, quartiles in rows}


def _levels_note(con, params: AggregateParams) -> str | None:
    """What the level rule cannot tell apart in this run (None when it can)."""
    relations = con.execute("SELECT count(*) FROM relations").fetchall()[0][0]
    if relations >= params.generic_relations:
        return None
    return (f"the run has {relations} relation{'s' if relations != 1 else ''}, fewer than generic_relations "
            f"({params.generic_relations}): no neuron can be generic by its relations, so relation and generic "
            f"levels are told apart only by generic_share ({params.generic_share} of the run's facts)")


def _output_counts(con, method: str, params: AggregateParams) -> dict:
    kept = list(params.levels)
    kn, facts_with = con.execute(
        "SELECT count(*), count(DISTINCT k.fact_id) FROM kn k JOIN neuron_levels l USING (method, layer, neuron) "
        "WHERE k.method = ? AND list_contains(?, l.level)", [method, kept]).fetchall()[0]
    relation = con.execute(f"SELECT count(*) FROM ({_relation_neurons_sql(params)}) WHERE method = ?", [method]).fetchall()[0][0]
    per_level = dict(con.execute(
        "SELECT l.level, count(*) FROM kn k JOIN neuron_levels l USING (method, layer, neuron) WHERE k.method = ? "
        "GROUP BY l.level", [method]).fetchall())
    facts_per_level = dict(con.execute(
        "SELECT l.level, count(DISTINCT k.fact_id) FROM kn k JOIN neuron_levels l USING (method, layer, neuron) "
        "WHERE k.method = ? GROUP BY l.level", [method]).fetchall())
    neurons_per_level = dict(con.execute("SELECT level, count(*) FROM neuron_levels WHERE method = ? GROUP BY level",
                                         [method]).fetchall())
    widest = con.execute("SELECT max(n_relations) FILTER (WHERE level = 'fact'), max(n_relations) FROM neuron_levels "
                         "WHERE method = ?", [method]).fetchall()[0]
    return {"knowledge_neurons": kn, "facts_with_knowledge_neurons": facts_with, "relation_neurons": relation,
            "shared_neurons": sum(neurons_per_level.get(level, 0) for level in LEVELS[1:]),
            "candidates": sum(per_level.values()),
            "knowledge_neurons_per_level": {level: per_level.get(level, 0) for level in LEVELS},
            "facts_per_level": {level: facts_per_level.get(level, 0) for level in LEVELS},
            "neurons_per_level": {level: neurons_per_level.get(level, 0) for level in LEVELS},
            "max_relations_of_a_fact_level_neuron": widest[0] or 0, "max_relations_of_a_neuron": widest[1] or 0}
