"""Synthetic `kn-ray attribute` outputs for tests and benchmarks, written as the pipeline writes.

Runs go through the run directory's own writer (`write_run`: committed shards, staged tables).

Each fact gets planted knowledge neurons (a few of its own, mostly in upper layers, plus
some of its relation's) that score high in most of its prompts, over uniform noise rows;
activations add neurons that fire for every prompt, which is why the paper's activation
baseline is the weaker method. Rows respect the keep policy (score >= 0.1 x the prompt's
max, activation >= 0.5 x the prompt's max), some prompts are skipped or fail, and some
facts have fewer than 3 prompts.

    python -m tests.synthetic OUT --neuron-rows 10000000 [--edits]     # from the repository root

Synthetic edits are built by the edit stage's own row builders (prompt_row, metric_rows,
as_table) from made-up probabilities, so they are edits tables by construction.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from kn_ray.engine.probe import Probe
from kn_ray.pipeline.layout import SHARD_KINDS, part_file, shard_name
from kn_ray.pipeline.record import RunRecord
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import ACTIVATIONS, KINDS, NEURONS, PROMPTS
from kn_ray.stages.aggregate.schemas import (FACT_CONSISTENCY, KNOWLEDGE_NEURONS, RELATION_NEURONS,
                                             SHARED_NEURON_FACTS, SHARED_NEURONS)
from kn_ray.stages.edit.outcomes import EDITS, as_table, metric_rows, prompt_row

RELATION_IDS = ["P17", "P19", "P20", "P27", "P30", "P36", "P37", "P39", "P101", "P103",
                "P106", "P108", "P127", "P131", "P136", "P138", "P140", "P159", "P176", "P178"]
SKIP_REASONS = ["target token not in vocabulary", "prompt longer than the context window"]
ERROR_REASONS = ["RuntimeError: CUDA out of memory", "ValueError: empty target"]
RELATION_NEURONS_PER_RELATION = 3
ALWAYS_ON_NEURONS = 24  # activation-only neurons that fire for any prompt
ATTEMPT = "synthetic"  # the attempt id of every synthetic part
TABLES = {"prompts": PROMPTS, "neurons": NEURONS, "activations": ACTIVATIONS, "edits": EDITS,
          "knowledge_neurons": KNOWLEDGE_NEURONS, "relation_neurons": RELATION_NEURONS,
          "shared_neurons": SHARED_NEURONS, "shared_neuron_facts": SHARED_NEURON_FACTS,
          "fact_consistency": FACT_CONSISTENCY}


@dataclass
class SyntheticSpec:
    facts: int = 300
    relations: int = 6
    min_prompts: int = 2
    max_prompts: int = 12
    layers: int = 12
    neurons: int = 3072
    noise_rows: float = 30.0  # mean noise neuron rows per usable prompt
    activation_noise_rows: float = 8.0
    skip_rate: float = 0.03
    error_rate: float = 0.01
    facts_per_part: int = 2000
    seed: int = 0
    model: str = "synthetic/bert-base-like"
    known_share: float | None = None  # probe: a probed prompt is known with this chance (None: no probe, an older run)
    attribute_unknown: bool = False  # probe: unknown prompts stay 'ok' (attributed, known = false), as the flag

    @property
    def rows_per_fact(self) -> float:
        """Expected neuron rows per fact (planted + noise)."""
        prompts = (self.min_prompts + self.max_prompts) / 2 * (1 - self.skip_rate - self.error_rate)
        return prompts * (self.noise_rows + 3.0)


def spec_for_rows(neuron_rows: int, **overrides) -> SyntheticSpec:
    """A spec whose dataset has about `neuron_rows` neuron rows."""
    spec = SyntheticSpec(**overrides)
    spec.facts = max(1, round(neuron_rows / spec.rows_per_fact))
    return spec


def relation_name(index: int) -> str:
    return RELATION_IDS[index] if index < len(RELATION_IDS) else f"P{9000 + index}"


def _within(counts: np.ndarray) -> np.ndarray:
    """For groups of the given sizes laid end to end, each element's index inside its group."""
    return np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)


def _upper_layers(rng, size: int, layers: int) -> np.ndarray:
    """Layers skewed towards the top, like the paper's knowledge-neuron histogram."""
    return np.clip(layers - 1 - np.abs(rng.normal(0, layers / 4, size)).astype(int), 0, layers - 1)


@dataclass
class _Planted:
    """Planted neurons of a batch of facts, flattened: entries [start[f], start[f] + count[f])."""

    start: np.ndarray
    count: np.ndarray
    layer: np.ndarray
    neuron: np.ndarray
    strength: np.ndarray  # score as a fraction of the prompt's max
    presence: np.ndarray  # probability of being kept in a prompt


def _plant(rng, spec: SyntheticSpec, fact_relation: np.ndarray, relation_neurons: np.ndarray) -> _Planted:
    own = rng.integers(1, 5, fact_relation.size)
    shared = rng.integers(1, 3, fact_relation.size)
    count = own + shared
    start = np.cumsum(count) - count
    fact = np.repeat(np.arange(fact_relation.size), count)
    slot = _within(count)
    is_own = slot < own[fact]
    which = (slot - own[fact] + rng.integers(0, RELATION_NEURONS_PER_RELATION, fact.size)) % RELATION_NEURONS_PER_RELATION
    relation_pick = relation_neurons[fact_relation[fact], which]
    layer = np.where(is_own, _upper_layers(rng, fact.size, spec.layers), relation_pick[:, 0])
    neuron = np.where(is_own, rng.integers(0, spec.neurons, fact.size), relation_pick[:, 1])
    return _Planted(start, count, layer, neuron, rng.uniform(0.3, 1.0, fact.size), rng.uniform(0.55, 1.0, fact.size))


def _planted_rows(rng, planted: _Planted, prompt_fact: np.ndarray, ok: np.ndarray, presence_scale: float, floor: float):
    """Planted (prompt, layer, neuron, factor) rows of the usable prompts."""
    counts = planted.count[prompt_fact[ok]]
    prompt = np.repeat(ok, counts)
    entry = planted.start[prompt_fact[prompt]] + _within(counts)
    kept = rng.random(entry.size) < planted.presence[entry] * presence_scale
    prompt, entry = prompt[kept], entry[kept]
    factor = floor + (1 - floor) * planted.strength[entry] * rng.uniform(0.85, 1.0, entry.size)
    return prompt, planted.layer[entry], planted.neuron[entry], factor


def _noise_rows(rng, spec: SyntheticSpec, ok: np.ndarray, mean_rows: float, floor: float, power: float):
    counts = np.maximum(rng.poisson(mean_rows, ok.size), 1)  # every usable prompt keeps its max row
    prompt = np.repeat(ok, counts)
    factor = floor + (1 - floor) * 0.6 * rng.random(prompt.size) ** power
    return prompt, rng.integers(0, spec.layers, prompt.size), rng.integers(0, spec.neurons, prompt.size), factor


def _always_on_rows(rng, ok: np.ndarray, always_on: np.ndarray, floor: float):
    prompt = np.repeat(ok, len(always_on))
    pick = np.tile(np.arange(len(always_on)), ok.size)
    kept = rng.random(prompt.size) < 0.5
    factor = floor + (1 - floor) * rng.random(int(kept.sum()))
    return prompt[kept], always_on[pick[kept], 0], always_on[pick[kept], 1], factor


def _finish_rows(spec: SyntheticSpec, sources, prompt_max: np.ndarray) -> dict[str, np.ndarray]:
    """Concatenate row sources, drop repeated (prompt, layer, neuron) keeping the first, and
    scale each prompt's factors so its largest row equals `prompt_max` (factors >= floor keep
    every row above floor x max)."""
    prompt, layer, neuron, factor = (np.concatenate(parts) for parts in zip(*sources))
    key = (prompt.astype(np.int64) * spec.layers + layer) * spec.neurons + neuron
    _, first = np.unique(key, return_index=True)
    prompt, layer, neuron, factor = prompt[first], layer[first], neuron[first], factor[first]
    top = np.zeros(prompt_max.size)
    np.maximum.at(top, prompt, factor)
    value = (factor / top[prompt] * prompt_max[prompt]).astype(np.float32)
    return {"prompt": prompt, "layer": layer.astype(np.int16), "neuron": neuron.astype(np.int32), "value": value}


def _row_table(rows: dict, prompt_ids: pa.Array, fact_ids: pa.Array, relations: pa.Array, value_name: str, schema):
    index = pa.array(rows["prompt"])
    return pa.table({"prompt_id": prompt_ids.take(index), "fact_id": fact_ids.take(index),
                     "relation": relations.take(index), "layer": rows["layer"], "neuron": rows["neuron"],
                     value_name: rows["value"]}, schema=schema)


def _prompt_table(rng, spec: SyntheticSpec, fact_index: np.ndarray, prompt_fact: np.ndarray,
                  status: np.ndarray, max_score: np.ndarray, probe: dict | None = None) -> pa.Table:
    n = prompt_fact.size
    ok = status == "ok"
    probed = probe["probed"] if probe else ok
    global_fact = fact_index[prompt_fact]
    k = _within(np.bincount(prompt_fact, minlength=fact_index.size))
    relation = [relation_name(g % spec.relations) for g in global_fact]
    fact_id = [f"{r}:{g:07d}" for r, g in zip(relation, global_fact)]
    template = [f"[X] {r} template {i} [Y]." for r, i in zip(relation, k)]
    reason = np.where(status == "skipped", rng.choice(SKIP_REASONS, n),
                      np.where(status == "error", rng.choice(ERROR_REASONS, n), None))
    if probe:
        reason = np.where(probed & ~ok, [f"not known (gold rank {r})" for r in probe["gold_rank"]], reason)
    gold = rng.beta(2, 3, n)
    top_prob = np.maximum(gold, rng.uniform(0, 1, n))
    completeness = pa.array([list(rng.exponential(1e-3, spec.layers).astype(np.float32)) if good else None
                             for good in ok], type=pa.list_(pa.float32()))
    return pa.table({
        "prompt_id": [f"{f}/{i}" for f, i in zip(fact_id, k)],
        "fact_id": fact_id,
        "relation": relation,
        "subject": [f"subject-{g}" for g in global_fact],
        "object": [f"object-{g % 211}" for g in global_fact],
        "template": template,
        "prompt": [t.replace("[X]", f"subject-{g}").replace(" [Y].", "") for t, g in zip(template, global_fact)],
        "target": [f" object-{g % 211}" for g in global_fact],
        "status": status,
        "error": reason,
        "gold_prob": np.where(probed, gold, np.nan),
        "gold_rank": pa.array(probe["gold_rank"], mask=~probed, type=pa.int32()) if probe else pa.nulls(n, pa.int32()),
        "known": pa.array(probe["known"], mask=~probed, type=pa.bool_()) if probe else pa.nulls(n, pa.bool_()),
        "top_token": np.where(ok, np.where(top_prob > gold, "the", [f"object-{g % 211}" for g in global_fact]), None),
        "top_prob": np.where(ok, top_prob, np.nan),
        "max_score": np.where(ok, max_score, np.nan).astype(np.float32),
        "completeness": completeness,
        "seconds": np.where(ok, rng.uniform(0.3, 1.5, n), rng.uniform(0.0, 0.05, n)),
        "evaluations": pa.array([[20] * spec.layers if good else None for good in ok], type=pa.list_(pa.int32())),
        "score_error": pa.array([[float("nan")] * spec.layers if good else None for good in ok],
                                type=pa.list_(pa.float32())),
        "p_clean": pa.nulls(n, pa.float32()),  # --mode trace only
        "p_corrupted": pa.nulls(n, pa.float32()),
    }, schema=PROMPTS)


def _part(rng, spec: SyntheticSpec, fact_index: np.ndarray, relation_neurons, always_on):
    fact_relation = fact_index % spec.relations
    planted = _plant(rng, spec, fact_relation, relation_neurons)
    prompt_fact = np.repeat(np.arange(fact_index.size), rng.integers(spec.min_prompts, spec.max_prompts + 1, fact_index.size))
    draw = rng.random(prompt_fact.size)
    status = np.where(draw < spec.error_rate, "error", np.where(draw < spec.error_rate + spec.skip_rate, "skipped", "ok"))
    probe = None
    if spec.known_share is not None:  # its own generator: without a probe, the same rows as before
        probe_rng = np.random.default_rng([spec.seed, 7, int(fact_index[0])])
        known = probe_rng.random(prompt_fact.size) < spec.known_share
        probe = dict(probed=status == "ok", known=known,
                     gold_rank=np.where(known, 1, probe_rng.integers(2, 500, prompt_fact.size)))
        if not spec.attribute_unknown:
            status = np.where(probe["probed"] & ~known, "skipped", status)  # the probe stage skips them
    ok = np.flatnonzero(status == "ok")
    score_max = rng.uniform(0.2, 3.0, prompt_fact.size)
    scores = _finish_rows(spec, [_planted_rows(rng, planted, prompt_fact, ok, 1.0, 0.1),
                                 _noise_rows(rng, spec, ok, spec.noise_rows, 0.1, 3)], score_max)
    activations = _finish_rows(spec, [_planted_rows(rng, planted, prompt_fact, ok, 0.8, 0.5),
                                      _always_on_rows(rng, ok, always_on, 0.5),
                                      _noise_rows(rng, spec, ok, spec.activation_noise_rows, 0.5, 2)],
                               rng.uniform(1.0, 6.0, prompt_fact.size))
    row_max = np.zeros(prompt_fact.size, np.float32)
    np.maximum.at(row_max, scores["prompt"], scores["value"])
    prompts = _prompt_table(rng, spec, fact_index, prompt_fact, status, row_max, probe)
    keys = [prompts["prompt_id"].combine_chunks(), prompts["fact_id"].combine_chunks(), prompts["relation"].combine_chunks()]
    return (prompts, _row_table(scores, *keys, "score", NEURONS),
            _row_table(activations, *keys, "activation", ACTIVATIONS))


def run_config(spec: SyntheticSpec, shards: int) -> dict:
    """run.json in the attribute stage's layout (docs/output-schema.md)."""
    return {"identity": {"model": spec.model, "attribution": {"rule": "left", "n_steps": 20},
                         "model_info": {"revision": "synthetic", "num_layers": spec.layers, "num_neurons": spec.neurons},
                         "keep": {"ratio": 0.1, "dense": False, "activation_ratio": 0.5},
                         "input": {"format": "synthetic"}, "plan": {"shards": shards}},
            "input_path": "synthetic", "options": {"synthetic": asdict(spec)}}


def write_run(out: str | Path, config: dict | None, shards: list[dict[str, pa.Table]],
              later: dict[str, pa.Table] | None = None, committed: int | None = None) -> RunDirectory:
    """Write a run through the run-directory API, as the pipeline does: run.json (`config`: its
    identity, options and input_path), each shard's tables as the parts of one attempt committed
    by the shard's marker (only the first `committed` shards, when given: a run in progress),
    then the later stages' tables (`later`). The attempt id is fixed, so the same arguments
    write the same files."""
    config = config if config is not None else {"identity": {"model": "hand-built"}}
    run = RunDirectory(out)
    record = run.open_run(RunRecord.of(config["identity"], options=config.get("options", {}),
                                       input_path=config.get("input_path", "")))
    for index, tables in enumerate(shards):
        name = shard_name(index)
        if committed is None or index < committed:
            run.commits.write_shard(name, tables, record.config_hash, {"shard": index}, attempt=ATTEMPT)
        else:
            run.commits.write_parts(name, ATTEMPT, tables, {"config_hash": record.config_hash, "shard": index})
    for table, rows in (later or {}).items():
        with run.staged(table) as tmp:
            pq.write_table(rows, tmp / part_file(0))
    return run


def write_synthetic_run(out: str | Path, spec: SyntheticSpec | None = None, committed: int | None = None) -> dict:
    """Write run.json, prompts/, neurons/ and activations/ under `out`, one shard per
    `facts_per_part` facts (only the first `committed` shards committed, when given); returns
    row counts."""
    spec = spec or SyntheticSpec()
    rng = np.random.default_rng(spec.seed)
    relation_neurons = np.stack([_upper_layers(rng, spec.relations * RELATION_NEURONS_PER_RELATION, spec.layers),
                                 rng.integers(0, spec.neurons, spec.relations * RELATION_NEURONS_PER_RELATION)], axis=1)
    relation_neurons = relation_neurons.reshape(spec.relations, RELATION_NEURONS_PER_RELATION, 2)
    always_on = np.stack([rng.integers(0, spec.layers, ALWAYS_ON_NEURONS),
                          rng.integers(0, spec.neurons, ALWAYS_ON_NEURONS)], axis=1)
    shards = []
    for first in range(0, spec.facts, spec.facts_per_part):
        fact_index = np.arange(first, min(first + spec.facts_per_part, spec.facts))
        shards.append(dict(zip(KINDS, _part(rng, spec, fact_index, relation_neurons, always_on))))
    run = write_run(out, run_config(spec, len(shards)), shards, committed=committed)
    if spec.known_share is not None:
        _write_probe_summary(run, spec, pa.concat_tables([shard["prompts"] for shard in shards]))
    return {kind: sum(shard[kind].num_rows for shard in shards) for kind in KINDS}


def _write_probe_summary(run: RunDirectory, spec: SyntheticSpec, prompts: pa.Table) -> None:
    """probe.json as the pipeline writes it (kn_ray.pipeline.known.relation_summary): the probed
    prompts are those with a `known` verdict; the chosen facts, those with a known prompt."""
    from kn_ray.pipeline.known import relation_summary

    probed = prompts.to_pandas()
    probed["status"] = np.where(probed.known.notna(), "ok", probed.status)
    chosen = set(probed[probed.known.fillna(False).astype(bool)].fact_id)
    run.write_summary("probe", dict(rule="top:1", min_known_prompts=1, attribute_unknown=spec.attribute_unknown,
                                    max_facts_per_relation=None, shards=1, failed=[],
                                    relations=relation_summary(pa.Table.from_pandas(probed), 1, chosen)))


def _as_table(frame: pd.DataFrame | pa.Table, schema: pa.Schema) -> pa.Table:
    """A table with the contract's columns; columns missing from a hand-built frame are null."""
    table = frame if isinstance(frame, pa.Table) else pa.Table.from_pandas(frame, preserve_index=False)
    columns = [table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
               for f in schema]
    return pa.Table.from_arrays(columns, schema=schema)


def write_tables(out: str | Path, config: dict | None = None, **frames) -> Path:
    """Write hand-built frames, keyed by table name (prompts=..., neurons=...), plus run.json:
    the attribute tables as one committed shard, the later stages' as one part each; tests
    build tiny runs with this. A pyarrow table is written as it is (its own schema)."""
    tables = {name: frame if isinstance(frame, pa.Table) else _as_table(frame, TABLES[name])
              for name, frame in frames.items() if frame is not None}
    shard = {name: t for name, t in tables.items() if name in SHARD_KINDS}
    write_run(out, config, [shard] if shard else [], {n: t for n, t in tables.items() if n not in shard})
    return Path(out)


EDIT_EFFECTS = {  # (op, condition) -> mean relative change of the gold probability
    ("suppress", "kn"): -0.35, ("suppress", "activation"): -0.12, ("suppress", "random"): -0.02,
    ("suppress", "other_relation"): -0.03, ("amplify", "kn"): 0.45, ("amplify", "activation"): 0.15,
    ("amplify", "random"): 0.01, ("amplify", "other_relation"): 0.02,
    ("update", "kn"): -0.6, ("update", "random"): -0.05, ("erase", "kn"): -0.5, ("erase", "random"): -0.05,
}
N_NEURONS = 3


def write_synthetic_edits(out: str | Path, facts: int = 200, seed: int = 0) -> int:
    """Write the edits table for the usable prompts of up to `facts` facts of `out`: every op
    and condition on each prompt, through the edit stage's row builders."""
    run = RunDirectory(out)
    rng = np.random.default_rng(seed)
    prompts = run.read("prompts", ["prompt_id", "fact_id", "relation", "status", "gold_prob"]).to_pandas()
    prompts = prompts[prompts.status == "ok"]
    chosen = prompts.fact_id.drop_duplicates().sample(min(facts, prompts.fact_id.nunique()), random_state=seed)
    prompts = prompts[prompts.fact_id.isin(chosen)]
    rows = []
    for (op, condition), effect in EDIT_EFFECTS.items():
        change = np.clip(rng.normal(effect, 0.1, len(prompts)), -0.99, None)
        for p, c in zip(prompts.itertuples(), change):
            row = prompt_row(op, p.relation, None if op == "erase" else p.fact_id, condition, "target", N_NEURONS,
                             p.prompt_id, _probe(rng, p.gold_prob), _probe(rng, min(1.0, p.gold_prob * (1 + c))))
            if op == "update":
                new_after = rng.uniform(0.3, 0.9) if condition == "kn" else rng.uniform(0.0, 0.1)
                row.update(new_object="object-0", new_prob_before=rng.uniform(0.0, 0.1), new_prob_after=new_after,
                           new_top1_after=bool(new_after > 0.5))
            rows.append(row)
    frame = pd.DataFrame(rows)
    edits = as_table(pd.concat([frame, metric_rows(frame)], ignore_index=True))
    with run.staged("edits") as tmp:
        pq.write_table(edits, tmp / part_file(0))
    return edits.num_rows


def _probe(rng, gold_prob: float) -> Probe:
    """A one-token probe whose top-1 is the gold token with probability gold_prob."""
    correct = bool(rng.random() < gold_prob)
    return Probe("", "", gold_prob=float(gold_prob), n_target_tokens=1, top_id=0 if correct else 1, first_target_id=0)


def write_explorable_run(out: str | Path, facts: int, edited_facts: int, seed: int, **spec) -> Path:
    """A synthetic run with every stage the explorer shows: attribution, aggregation and edits
    (`spec`: more SyntheticSpec fields, e.g. known_share for a probed run)."""
    from kn_ray.stages.aggregate import aggregate

    write_synthetic_run(out, SyntheticSpec(facts=facts, relations=3, layers=6, neurons=256, seed=seed, **spec))
    aggregate(out)
    write_synthetic_edits(out, facts=edited_facts)
    return Path(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--neuron-rows", type=int, default=None, help="size the dataset to about this many neuron rows")
    parser.add_argument("--facts", type=int, default=SyntheticSpec.facts)
    parser.add_argument("--relations", type=int, default=SyntheticSpec.relations)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--edits", action="store_true", help="also write a synthetic edits/ table")
    args = parser.parse_args(argv)
    options = {"relations": args.relations, "seed": args.seed}
    spec = spec_for_rows(args.neuron_rows, **options) if args.neuron_rows else SyntheticSpec(facts=args.facts, **options)
    counts = write_synthetic_run(args.out, spec)
    if args.edits:
        counts["edits"] = write_synthetic_edits(args.out, seed=args.seed)
    print(json.dumps({"out": str(args.out), "facts": spec.facts, **counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

