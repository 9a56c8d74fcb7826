"""`kn-ray aggregate`'s parameters, declared once (defaults, help, flags): the CLI derives its
flags from them (kn_ray.interfaces.declared). Importing this module is cheap (no DuckDB).

The knowledge-neuron rule (the authors' `2_get_kn.py`) is written here once, as SQL conditions
(`coarse`, `knowledge`) that the aggregate stage, the edit stage's held-out split and the
explorer all use, with the parameters the run's aggregate summary recorded (`recorded`)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.fields import option

if TYPE_CHECKING:
    from kn_ray.pipeline.rundir import RunDirectory

EPS = 1e-9  # `count >= share * n` is meant in decimals: 0.6 * 10 must admit a count of 6


@dataclass(frozen=True)
class Method:
    """What scores a neuron (the `method` column of knowledge_neurons and relation_neurons): its
    integrated gradient, or, as the paper's baseline, its activation."""

    name: str
    table: str  # the attribute stage's table it reads
    column: str  # its value column


METHODS = (Method("ig", "neurons", "score"), Method("activation", "activations", "activation"))
METHOD_NAMES = tuple(m.name for m in METHODS)
LEVELS = ("fact", "relation", "generic")  # the `level` of a knowledge neuron (docs/downstream.md, rule 6)


@dataclass
class AggregateParams:
    t: float = option(0.2, "coarse threshold: score >= t x the prompt's max")
    activation_t: float = option(0.5, "the same for the activation baseline")
    p: float = option(0.7, "share of a fact's usable prompts a knowledge neuron must be coarse in")
    min_prompts: int = option(3, "and at least this many prompts")
    adaptive: bool = option(False, "tune p per relation to 2..5 knowledge neurons per fact")
    relation_share: float = option(0.1, "share of a relation's facts a relation neuron must have")
    levels: tuple[str, ...] = option(("fact",), "levels of knowledge neurons the knowledge_neurons table keeps "
                                               "(the others are listed in shared_neurons)", choices=LEVELS)
    relation_min_facts: int = option(2, "a knowledge neuron of at least this many facts (of fewer than "
                                        "--generic-relations relations) is relation-level, not fact-level")
    generic_relations: int = option(2, "a knowledge neuron of facts of at least this many relations is generic")
    generic_share: float = option(0.5, "a knowledge neuron of at least this share of the run's facts is generic")
    include_unknown: bool = option(False, "count prompts the model does not know (prompts.known = false, attributed "
                                          "with the attribute stage's flag) as usable")
    circuit_share: float = option(0.5, "circuits run: share of a relation's facts whose circuit an edge of the "
                                       "relation circuit is in")
    circuit_top: int = option(100, "circuits run: a fact's circuit, its top edges by |score| (at most the run's "
                                   "--top-edges)")
    neuron_run: str | None = option(None, "circuits run: an aggregated neuron run of the same facts; links each fact's "
                                           "circuit to the layers of its knowledge neurons (table circuit_neurons)",
                                     metavar="RUN")
    memory_limit: str = option(MEMORY_LIMIT, "DuckDB memory limit; beyond it, joins and group-bys spill to disk")
    threads: int | None = option(None, "DuckDB threads (default: all cores)")
    methods: tuple[str, ...] = option(METHOD_NAMES, "skip the activation baseline", flag="--no-activation",
                                      action="store_const", const=METHOD_NAMES[:1])

    @classmethod
    def recorded(cls, summary: dict | None) -> "AggregateParams":
        """The parameters an aggregate summary recorded (defaults for any it lacks, or without one)."""
        saved = (summary or {}).get("parameters", {})
        values = {f.name: saved[f.name] for f in fields(cls) if saved.get(f.name) is not None}
        for name in ("methods", "levels"):
            if name in values:
                values[name] = tuple(values[name])
        return cls(**values)

    def threshold(self, method: str) -> float:
        return self.t if method == "ig" else self.activation_t

    # ---- the rule, as SQL conditions --------------------------------------------------------
    def coarse(self, method: str, value: str, top: str) -> str:
        """A `value` of a prompt whose max is `top` is coarse: value >= t x top."""
        return f"{value} >= CAST({float(self.threshold(method))!r} AS DOUBLE) * {top}"

    def knowledge(self, count: str, n: str, p: str | None = None, at_least: str | None = None) -> str:
        """Coarse in `count` of a fact's `n` usable prompts makes a knowledge neuron: count >= p x n
        (p a plain share, no rounding; EPS) and count >= min_prompts. `p`, `at_least`: SQL
        instead of self.p (a per-relation p) and min_prompts."""
        p = p or f"CAST({float(self.p)!r} AS DOUBLE)"
        return f"{count} >= {p} * {n} - {EPS} AND {count} >= {at_least or int(self.min_prompts)}"

    def validate(self, run: RunDirectory) -> None:
        for method in self.methods:
            t, keep = self.threshold(method), run.config.keep_ratio(method)
            if not keep - EPS <= t <= 1:
                flag = "--t" if method == "ig" else "--activation-t"
                raise ValueError(f"{flag} {t}: must lie in [{keep}, 1]; rows below {keep} x the prompt's max "
                                 f"were not stored by the attribute stage ({method})")
        if not 0 < self.p <= 1 or not 0 < self.relation_share <= 1:
            raise ValueError("p and relation share must lie in (0, 1]")
        if self.min_prompts < 1:
            raise ValueError("min_prompts must be at least 1")
        self.check_levels()

    def check_levels(self) -> None:
        if not self.levels or set(self.levels) - set(LEVELS):
            raise ValueError(f"levels must be some of {', '.join(LEVELS)}, got {', '.join(self.levels) or 'none'}")
        if self.relation_min_facts < 2 or self.generic_relations < 2:
            raise ValueError("relation_min_facts and generic_relations must be at least 2 (one fact or one relation "
                             "is what a fact-level neuron has)")
        if not 0 < self.generic_share <= 1:
            raise ValueError("generic_share must lie in (0, 1]")

    def usable(self, known: bool, alias: str = "") -> str:
        """SQL condition on a `prompts` row: usable for aggregation. `known`: the table has the
        probe's `known` column (null, e.g. an error row or an older part, counts as known);
        `alias`: the row's table alias in the query ("p": p.status, p.known)."""
        at = f"{alias}." if alias else ""
        if known and not self.include_unknown:
            return f"{at}status = 'ok' AND coalesce({at}known, true)"
        return f"{at}status = 'ok'"

    def usable_in(self, con, prompts: str, alias: str = "") -> str:
        """`usable` for the prompts relation `prompts` (SQL: a table or a read_parquet(...)) of the
        DuckDB connection `con`: the one rule of usable prompts that aggregate, report, explore
        and edit all apply (older runs' prompts have no `known` column: every ok prompt)."""
        return self.usable(has_column(con, prompts, "known"), alias)

    def level(self, n_facts: str, n_relations: str, run_facts: str) -> str:
        """SQL: the level of a knowledge neuron of `n_facts` facts of `n_relations` relations, of a
        run of `run_facts` facts (with a usable prompt)."""
        shared = f"{n_facts} >= {int(self.relation_min_facts)}"  # never one fact alone, however small the run
        return (f"CASE WHEN {n_relations} >= {int(self.generic_relations)} OR ({shared} AND {n_facts} >= "
                f"CAST({float(self.generic_share)!r} AS DOUBLE) * {run_facts} - {EPS}) THEN 'generic' "
                f"WHEN {shared} THEN 'relation' ELSE 'fact' END")


def has_column(con, relation: str, name: str) -> bool:
    """Whether the SQL relation `relation` of DuckDB connection `con` has column `name`."""
    return name in [row[0] for row in con.execute(f"DESCRIBE SELECT * FROM {relation}").fetchall()]
