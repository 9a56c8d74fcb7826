"""The probe stage of a run: what the model knows, before any attribution is spent.

Probe shards (`part-probe-NNNNN`) run on the same actors, with the same exactly-once commits
and resume as attribution shards. With `--max-facts-per-relation N` the pool is probed in
windows (`known.probe_windows`) until each relation has N known facts or none left; each
window's plan depends only on the input and the committed results of the windows before it,
so a re-run plans the same shards and skips the finished ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from .known import FIRST_WINDOW, PROBE, PROBE_SHARD, known_facts, probe_windows
from .layout import PROBE_GROUP
from .options import RunOptions
from .plan import Shard, plan_shards
from .prompts import PromptSpec
from .rundir import RunDirectory


@dataclass
class ProbeResult:
    table: pa.Table  # the probe rows of every probed prompt
    shards: list[Shard] = field(default_factory=list)  # every probe shard planned
    written: int = 0  # probe shards computed by this run
    prompts_computed: int = 0
    failed: dict[str, str] = field(default_factory=dict)
    retries: int = 0
    actors_lost: int = 0
    actors_back: int = 0
    seconds: float = 0.0


def fact_order(specs: list[PromptSpec], input_order: list[str]) -> dict[str, list[str]]:
    """Per relation, the fact ids that have a prompt to probe, in input order."""
    probeable = {s.fact_id for s in specs if s.status is None}
    order: dict[str, list[str]] = {}
    seen: set[str] = set()
    relation = {s.fact_id: s.relation for s in specs}
    for fact_id in input_order:
        if fact_id in probeable and fact_id not in seen:
            seen.add(fact_id)
            order.setdefault(relation[fact_id], []).append(fact_id)
    return order


def run_probe(run: RunDirectory, run_hash: str, options: RunOptions, specs: list[PromptSpec],
              input_order: list[str], compute) -> ProbeResult:
    """Probe windows of facts until each relation has enough known facts. `compute(shards) ->
    DispatchResult` runs and commits shards (the driver's `run_shards` on its pool)."""
    import time

    started = time.perf_counter()
    order = fact_order(specs, input_order)
    by_fact: dict[str, list[PromptSpec]] = {}
    for spec in specs:
        if spec.status is None:
            by_fact.setdefault(spec.fact_id, []).append(spec)
    limit, min_known = options.filters.max_facts_per_relation, options.probe.min_known_prompts
    result = ProbeResult(PROBE.empty_table())
    size = PROBE_SHARD  # not --shard-size: a probe shard costs about 1/40 of an attribution shard
    windows = probe_windows(order, limit, 1 if options.probe.rule.kind == "any" else FIRST_WINDOW)
    enough: set[str] = set()  # relations with `limit` known facts
    for window in windows:
        todo = [s for rel, ids in window.items() if rel not in enough for f in ids for s in by_fact[f]]
        if not todo:
            break
        shards = plan_shards(todo, size, first_id=len(result.shards), group=PROBE_GROUP)
        result.shards += shards
        done = run.commits.finished([s.name for s in shards], run_hash)
        computed = compute([s for s in shards if s.name not in done])
        result.written += len(computed.written)
        result.prompts_computed += computed.prompts
        result.failed.update(computed.failed)
        result.retries += computed.retries
        result.actors_lost += computed.actors_lost
        result.actors_back += computed.actors_back
        result.table = read_probe(run, run_hash, result.shards)
        if result.failed or limit is None:
            break
        known = known_facts(result.table, min_known, options.probe.rule)
        enough = {rel for rel, ids in order.items() if sum(f in known for f in ids) >= limit}
        if len(enough) == len(order):
            break
    result.seconds = time.perf_counter() - started
    return result


def read_probe(run: RunDirectory, run_hash: str, shards: list[Shard]) -> pa.Table:
    """The committed probe rows of `shards` (markers of other, stale plans are never read)."""
    names = {s.name for s in shards}
    markers = {n: m for n, m in run.commits.markers(run_hash).items() if n in names}
    files = run.commits.committed("probe", markers)
    if not files:
        return PROBE.empty_table()
    import pyarrow.dataset as ds

    return ds.dataset(files, format="parquet", filesystem=run.fs).to_table().replace_schema_metadata(None)
