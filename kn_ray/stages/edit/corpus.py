"""What the edit experiments run on: the run's prompts and neurons, cut into work units.

A work unit is plain data (prompt texts, neuron lists, sampled control prompts), so it
pickles to a Ray actor and the experiment on it is a pure function of (model, unit). Every
random choice is seeded by `(seed, the fact or relation id, purpose)`, never by the order or
the grouping of the work, so a result does not depend on how many workers ran it.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

from kn_ray.pipeline.layout import PART
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.aggregate.params import AggregateParams
from kn_ray.stages.duck import connect
from kn_ray.stages.edit.options import OPS, EditSettings
from kn_ray.stages.edit.criteria import SYMMETRIC_RELATIONS, reversed_prompt

Neurons = list[tuple[int, int]]  # (layer, neuron)
NEW_OBJECT_CANDIDATES = 8


@dataclass(frozen=True)
class PromptRef:
    prompt_id: str
    prompt: str
    target: str


@dataclass
class FactItem:
    """One fact's knowledge neurons and the prompts an experiment reads them on."""

    fact_id: str
    relation: str
    prompts: list[PromptRef]
    kn: Neurons
    activation: Neurons = field(default_factory=list)  # suppress / amplify control (b)
    controls: list[PromptRef] = field(default_factory=list)  # other relations' prompts, control (a)
    new_objects: list[str] = field(default_factory=list)  # update: candidates in seeded order (the worker
    # takes the first the tokenizer can tell apart from the old object)
    same_relation: list[PromptRef] = field(default_factory=list)  # other facts, same relation (locality)
    other_relation: list[PromptRef] = field(default_factory=list)  # update: facts of other relations
    reverse: list[PromptRef] = field(default_factory=list)  # symmetric relations: the reversed fact's prompts
    heldout: list[PromptRef] = field(default_factory=list)  # the fact's prompts that `seen_kn` was not found from
    seen_kn: Neurons = field(default_factory=list)  # knowledge neurons from the fact's other prompts only


@dataclass
class RelationItem:
    """Erase: a relation's top relation neurons, its prompts and other relations' prompts."""

    relation: str
    neurons: Neurons
    prompts: list[PromptRef]
    other_relation: list[PromptRef]


@dataclass
class WorkUnit:
    op: str
    index: int
    items: list[FactItem] | list[RelationItem]
    settings: EditSettings


def rng_for(seed: int, *keys: str) -> np.random.Generator:
    """A generator seeded by the run seed and stable string keys (crc32, not Python's hash)."""
    return np.random.default_rng([seed, *(zlib.crc32(k.encode()) for k in keys)])


def missing_aggregate(run: RunDirectory, table: str) -> FileNotFoundError:
    return FileNotFoundError(f"{run.location(table)}: no {PART}*.parquet files; run `kn-ray aggregate {run}` first")


def refuse_unknown(run: RunDirectory, prompts: pd.DataFrame, **asked) -> None:
    """ValueError naming the relations / fact ids asked for that no prompt of the run has."""
    for name, values in asked.items():
        column = name[:-1]  # relations -> relation, fact_ids -> fact_id
        present = set(prompts[column])
        missing = [v for v in dict.fromkeys(values or ()) if v not in present]
        if missing:
            flag = "--" + column.replace("_", "-")
            some = ", ".join(sorted(present)[:8]) + (", ..." if len(present) > 8 else "")
            raise ValueError(f"{flag} {', '.join(missing)}: no such {column.replace('_', ' ')} in "
                             f"{run.location('prompts')} (it has {len(present)}: {some})")


class EditCorpus:
    """The usable prompts (AggregateParams.usable) and the aggregated neurons of one run, indexed once for building work units
    (per-fact lookups are dictionary hits, control draws are rejection samples: no scans per fact)."""

    def __init__(self, out, *, relations=None, fact_ids=None):
        self.run = RunDirectory(out).require()
        if not self.run.parts("knowledge_neurons"):
            raise missing_aggregate(self.run, "knowledge_neurons")
        prompts = read_parts(self.run, "prompts", ["prompt_id", "fact_id", "relation", "subject", "object", "template",
                                              "prompt", "target", "status", "max_score"] + self._known_column())
        refuse_unknown(self.run, prompts, relations=relations, fact_ids=fact_ids)
        prompts = self._usable(prompts)
        kn = read_parts(self.run, "knowledge_neurons", ["fact_id", "relation", "layer", "neuron", "method"])
        if relations:
            prompts, kn = prompts[prompts.relation.isin(relations)], kn[kn.relation.isin(relations)]
        self.prompts = prompts.sort_values(["relation", "fact_id", "prompt_id"], ignore_index=True)
        self.all_facts = self.prompts.drop_duplicates("fact_id")[["fact_id", "relation", "object"]].reset_index(drop=True)
        self.fact_ids = set(fact_ids) if fact_ids else None
        self.relations = tuple(relations or ())
        kn = kn.sort_values(["fact_id", "method", "layer", "neuron"])
        ig = kn[kn.method == "ig"]
        self._facts_per_neuron = ig.groupby(["relation", "layer", "neuron"]).fact_id.nunique().to_dict()
        self._facts_per_relation = self.all_facts.relation.value_counts().to_dict()
        self._neurons = {key: list(zip(g.layer.astype(int).tolist(), g.neuron.astype(int).tolist()))
                         for key, g in kn.groupby(["fact_id", "method"], sort=False)}
        self._by_fact = {f: _refs(g) for f, g in self.prompts.groupby("fact_id", sort=False)}
        self._relation_of = dict(zip(self.all_facts.fact_id, self.all_facts.relation))
        self._relation_rn: pd.DataFrame | None = None

    def _known_column(self) -> list[str]:
        """["known"] when the run's prompts have the probe's column (runs before the probe do not)."""
        return ["known"] if "known" in self.run.dataset("prompts").schema.names else []

    def _usable(self, prompts: pd.DataFrame) -> pd.DataFrame:
        """The usable prompts, by the aggregation's own rule and recorded parameters
        (AggregateParams.usable: status 'ok' and known, unless aggregated with --include-unknown):
        the edits measure the prompts the knowledge neurons were found from."""
        params = AggregateParams.recorded(self.run.summary("aggregate"))
        with connect() as con:
            con.register("prompts", prompts)
            kept = con.execute(f"SELECT prompt_id FROM prompts WHERE {params.usable_in(con, 'prompts')}").df()
        usable = prompts[prompts.prompt_id.isin(set(kept.prompt_id))]
        return usable.drop(columns=["status"] + self._known_column())

    # ---- lookups ----------------------------------------------------------------------------
    @property
    def facts_with_neurons(self) -> int:
        """Facts (of the selected relations) with ig knowledge neurons."""
        return sum(method == "ig" for _, method in self._neurons)

    def neurons(self, fact_id: str, method: str) -> Neurons:
        return self._neurons.get((fact_id, method), [])

    def refs(self, fact_id: str) -> list[PromptRef]:
        return self._by_fact.get(fact_id, [])

    def facts(self, settings: EditSettings) -> pd.DataFrame:
        """fact_id, relation, object of the facts with ig knowledge neurons and an ok prompt,
        at most `max_facts` per relation (a seeded sample), sorted."""
        facts = self.all_facts[np.array([(f, "ig") in self._neurons for f in self.all_facts.fact_id], dtype=bool)]
        if self.fact_ids is not None:
            facts = facts[facts.fact_id.isin(self.fact_ids)]
        if settings.max_facts is not None:
            keep = [g.iloc[np.sort(rng_for(settings.seed, relation, "facts").choice(
                        len(g), min(len(g), settings.max_facts), replace=False))]
                    for relation, g in facts.groupby("relation", sort=True)]
            facts = pd.concat(keep) if keep else facts
        return facts.sort_values(["relation", "fact_id"], ignore_index=True)

    def specific_neurons(self, fact_id: str, relation: str, shared_share: float | None) -> Neurons:
        """The fact's ig neurons without those that are also knowledge neurons of more than
        `shared_share` of its relation's facts (the authors' update filter: a neuron most of the
        relation shares would change every fact of the relation, not this one)."""
        neurons = self.neurons(fact_id, "ig")
        if shared_share is None:
            return neurons
        limit = shared_share * self._facts_per_relation.get(relation, 0)
        return [(l, n) for l, n in neurons if self._facts_per_neuron[(relation, l, n)] - 1 <= limit]

    def relation_neurons(self) -> pd.DataFrame:
        """relation, layer, neuron, n_facts of the ig relation neurons (empty without the table)."""
        if self._relation_rn is None:
            columns = ["relation", "layer", "neuron", "n_facts", "method"]
            rn = read_parts(self.run, "relation_neurons", columns) if self.run.parts("relation_neurons") else \
                pd.DataFrame(columns=columns)
            self._relation_rn = rn[rn.method == "ig"].astype({"layer": int, "neuron": int, "n_facts": int})
        return self._relation_rn

    # ---- sampling ---------------------------------------------------------------------------
    def other_relation_prompts(self, relation: str, k: int, rng: np.random.Generator) -> list[PromptRef]:
        """Up to k ok prompts of relations other than `relation`, drawn without replacement."""
        rows = _draw_excluding(self.prompts.relation.to_numpy(), relation, k, rng)
        return _refs(self.prompts.iloc[rows])

    def other_relation_facts(self, relation: str, k: int, rng: np.random.Generator) -> list[PromptRef]:
        """All ok prompts of up to k facts of other relations."""
        rows = _draw_excluding(self.all_facts.relation.to_numpy(), relation, k, rng)
        return [ref for fact_id in self.all_facts.fact_id.iloc[rows] for ref in self.refs(fact_id)]

    def same_relation_facts(self, fact_id: str, relation: str, k: int, rng: np.random.Generator) -> list[PromptRef]:
        """All ok prompts of up to k other facts of the same relation."""
        ids = self.all_facts.fact_id[(self.all_facts.relation == relation) & (self.all_facts.fact_id != fact_id)]
        chosen = np.sort(rng.choice(ids.to_numpy(), size=min(k, len(ids)), replace=False))
        return [ref for f in chosen for ref in self.refs(f)]

    # ---- items ------------------------------------------------------------------------------
    def scale_items(self, settings: EditSettings) -> list[FactItem]:
        """Suppress / amplify: each fact's ig and activation neurons, other-relation controls, and
        the criteria's prompts: other facts of the relation, the reversed fact, held-out templates."""
        facts = self.facts(settings)
        splits = {f: self.template_split(f, settings.seed) for f in facts.fact_id}
        seen = self.neurons_from(facts.fact_id, {f: s for f, (s, _) in splits.items()})
        return [FactItem(f.fact_id, f.relation, self.refs(f.fact_id), self.neurons(f.fact_id, "ig"),
                         activation=self.neurons(f.fact_id, "activation"),
                         controls=self.other_relation_prompts(f.relation, settings.control_prompts,
                                                              rng_for(settings.seed, f.fact_id, "controls")),
                         same_relation=self.same_relation_facts(f.fact_id, f.relation, settings.ppl_facts,
                                                                rng_for(settings.seed, f.fact_id, "same_relation")),
                         reverse=self.reversed_refs(f.fact_id), heldout=splits[f.fact_id][1],
                         seen_kn=seen.get(f.fact_id, []))
                for f in facts.itertuples()]

    # ---- the criteria's prompts ---------------------------------------------------------------
    def reversed_refs(self, fact_id: str) -> list[PromptRef]:
        """Symmetric relations: the prompts of the reversed fact (object and subject swapped), from
        the fact's own templates; [] for other relations."""
        if self._relation_of.get(fact_id) not in SYMMETRIC_RELATIONS:
            return []
        rows = self.prompts[self.prompts.fact_id == fact_id]
        refs = []
        for r in rows.itertuples():
            pair = reversed_prompt(r.template, r.subject, r.object, masked="[MASK]" in r.prompt)
            if pair is not None:
                refs.append(PromptRef(f"{r.prompt_id}:reverse", *pair))
        return refs

    def template_split(self, fact_id: str, seed: int) -> tuple[list[PromptRef], list[PromptRef]]:
        """(seen, held out): a seeded half of the fact's prompts (rounded up), and the rest."""
        refs = self.refs(fact_id)
        if len(refs) < 2:
            return refs, []
        order = rng_for(seed, fact_id, "templates").permutation(len(refs))
        cut = (len(refs) + 1) // 2
        return [refs[i] for i in sorted(order[:cut])], [refs[i] for i in sorted(order[cut:])]

    def neurons_from(self, fact_ids, seen: dict[str, list[PromptRef]]) -> dict[str, Neurons]:
        """Knowledge neurons of each fact from its `seen` prompts only: the aggregate stage's rule
        and recorded parameters (`AggregateParams`), except that a fact with fewer than
        min_prompts seen prompts (the seen half of a few templates) needs all of them. Neurons the
        aggregate classed at a level its knowledge_neurons table leaves out (`shared_neurons`,
        e.g. relation and generic ones by default) are left out here too."""
        params = AggregateParams.recorded(self.run.summary("aggregate"))
        ids = {ref.prompt_id: f for f, refs in seen.items() for ref in refs}
        if not ids or not self.run.parts("neurons"):
            return {}
        dataset = self.run.dataset("neurons")
        if not {"prompt_id", "layer", "neuron", "score"} <= set(dataset.schema.names):
            return {}  # a dense layout: no per-neuron rows to threshold here
        rows = dataset.to_table(columns=["prompt_id", "layer", "neuron", "score"],
                                filter=ds.field("prompt_id").isin(list(ids))).to_pandas()
        rows["top"] = rows.prompt_id.map(self.prompts.set_index("prompt_id").max_score)
        rows["fact_id"] = rows.prompt_id.map(ids)
        seen_n = pd.DataFrame({"fact_id": list(seen), "n": [len(refs) for refs in seen.values()]})
        with connect() as con:
            con.register("seen_rows", rows)
            con.register("seen_n", seen_n)
            kept = con.execute(f"""
                SELECT c.fact_id, c.layer, c.neuron
                FROM (SELECT fact_id, layer, neuron, count(DISTINCT prompt_id) AS n_prompts FROM seen_rows
                      WHERE {params.coarse("ig", "score", "top")} GROUP BY fact_id, layer, neuron) c
                JOIN seen_n s ON c.fact_id = s.fact_id
                WHERE {params.knowledge("c.n_prompts", "s.n", at_least=f"least({int(params.min_prompts)}, s.n)")}
                ORDER BY c.fact_id, c.layer, c.neuron""").df()
        dropped = self._other_levels(params)
        kept = kept[[key not in dropped for key in zip(kept.layer.astype(int), kept.neuron.astype(int))]]
        return {f: list(zip(g.layer.astype(int), g.neuron.astype(int))) for f, g in kept.groupby("fact_id")}

    def _other_levels(self, params: AggregateParams) -> set[tuple[int, int]]:
        """(layer, neuron) of the ig neurons `shared_neurons` lists at a level not in params.levels
        (none for a run aggregated before levels existed)."""
        if not self.run.parts("shared_neurons"):
            return set()
        shared = read_parts(self.run, "shared_neurons", ["method", "layer", "neuron", "level"])
        shared = shared[(shared.method == "ig") & ~shared.level.isin(params.levels)]
        return set(zip(shared.layer.astype(int), shared.neuron.astype(int)))

    def update_items(self, settings: EditSettings) -> list[FactItem]:
        """Update: new-object candidates per fact (a seeded order of its relation's other objects)
        and the prompts of the perplexity checks. Facts left with no neuron or no other object are skipped."""
        objects = {r: sorted(set(g.object)) for r, g in self.all_facts.groupby("relation")}
        items = []
        for f in self.facts(settings).itertuples():
            kn = self.specific_neurons(f.fact_id, f.relation, settings.shared_share)
            others = [o for o in objects[f.relation] if o != f.object]
            if not kn or not others:
                continue
            order = rng_for(settings.seed, f.fact_id, "new_object").permutation(len(others))[:NEW_OBJECT_CANDIDATES]
            items.append(FactItem(
                f.fact_id, f.relation, self.refs(f.fact_id), kn, new_objects=[others[i] for i in order],
                same_relation=self.same_relation_facts(f.fact_id, f.relation, settings.ppl_facts,
                                                       rng_for(settings.seed, f.fact_id, "same_relation")),
                other_relation=self.other_relation_facts(f.relation, settings.ppl_facts,
                                                         rng_for(settings.seed, f.fact_id, "other_relation")),
                reverse=self.reversed_refs(f.fact_id)))
        return items

    def erase_items(self, settings: EditSettings) -> list[RelationItem]:
        """Erase: each relation's top `erase_top` relation neurons (most facts first)."""
        if not self.run.parts("relation_neurons"):
            raise missing_aggregate(self.run, "relation_neurons")
        rn = self.relation_neurons()
        items = []
        for relation, group in self.facts(settings).groupby("relation", sort=True):
            top = rn[rn.relation == relation].sort_values(["n_facts", "layer", "neuron"],
                                                          ascending=[False, True, True]).head(settings.erase_top)
            if top.empty:
                continue
            items.append(RelationItem(
                relation, list(zip(top.layer.tolist(), top.neuron.tolist())),
                [ref for fact_id in group.fact_id for ref in self.refs(fact_id)],
                self.other_relation_prompts(relation, settings.erase_other_prompts,
                                            rng_for(settings.seed, relation, "erase_other"))))
        return items

    def units(self, op: str, settings: EditSettings, unit_facts: int = 16) -> list[WorkUnit]:
        """The work of one op: `unit_facts` facts per unit (erase: one relation per unit)."""
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; known: {', '.join(OPS)}")
        if op == "erase":
            items, size = self.erase_items(settings), 1
        else:
            items = self.update_items(settings) if op == "update" else self.scale_items(settings)
            size = max(1, unit_facts)
        return [WorkUnit(op, i, items[start:start + size], settings)
                for i, start in enumerate(range(0, len(items), size))]


def _draw_excluding(labels: np.ndarray, exclude: str, k: int, rng: np.random.Generator) -> np.ndarray:
    """Up to k sorted row indices whose label is not `exclude`: an oversampled draw, filtered
    (O(k) for a big pool), or the exact pool when the draw falls short."""
    if k <= 0 or not len(labels):
        return np.empty(0, dtype=np.int64)
    draw = rng.choice(len(labels), size=min(len(labels), 2 * k + 16), replace=False)
    rows = draw[labels[draw] != exclude][:k]
    if len(rows) < k:
        pool = np.flatnonzero(labels != exclude)
        rows = rng.choice(pool, size=min(k, len(pool)), replace=False)
    return np.sort(rows)


def retarget(target: str, new_object: str) -> str:
    """The target with the object replaced, keeping its leading whitespace (" Paris" -> " Rome")."""
    return target[: len(target) - len(target.lstrip())] + new_object


def _refs(rows: pd.DataFrame) -> list[PromptRef]:
    return [PromptRef(p, q, t) for p, q, t in zip(rows.prompt_id, rows.prompt, rows.target)]


def read_parts(run: RunDirectory, table: str, columns: list[str]) -> pd.DataFrame:
    """Columns of a table's parts, through the run directory (attribute tables: marker-named only)."""
    return run.dataset(table).to_table(columns=columns).to_pandas()
