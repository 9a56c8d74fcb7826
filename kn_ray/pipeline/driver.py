"""One attribution run end to end: facts -> plan -> run.json -> shards on Ray -> summary.

Ray is imported only when the run starts (`executor.open_executor`: `ray_env.prepare`, then
`pool`), so facts, plans and the run directory stay usable without it; with `--executor local`
it is never imported (the shards run in this process, through the same dispatch and commits). Re-running the same command
resumes: shards whose files are whole are skipped; a different configuration against the same
output directory is refused. `--facts` and `--output` may be URIs (`uris.filesystem`); facts on
an object store are copied to a temporary local directory first.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path

from kn_ray import __version__

from .facts import FactSet, detect_format, read_facts
from .known import choose_facts, known_facts, relation_summary, with_probe
from .options import RunOptions
from .plan import Shard, auto_shard_size, fingerprint, plan_shards
from .corrupt import with_candidates
from .probe_stage import ProbeResult, fact_order, run_probe
from .prompts import PromptSet, PromptSpec, build_prompts
from .record import RunRecord
from .rundir import RunDirectory
from .uris import local_copy, public_uri


@dataclass
class RunSummary:
    output: str
    shards: int
    resumed: int  # shards finished by an earlier run
    written: int
    failed: dict[str, str]
    retries: int
    actors_lost: int
    prompts_computed: int  # prompts in the shards written by this run
    seconds: float  # wall time of the whole command
    dispatch_seconds: float  # wall time of the sharded work (after the model loaded)
    counts: dict[str, int] = field(default_factory=dict)  # status -> prompts, whole run
    workers: str = ""  # the actor plan, as chosen
    stale_removed: int = 0  # parts of unfinished attempts deleted
    actors_back: int = 0  # lost actors that came back (restarted, model reloaded) and rejoined the pool
    probe: dict = field(default_factory=dict)  # the probe stage's counts (`probe_counts`)

    @property
    def ok(self) -> bool:
        return not self.failed

    @property
    def throughput(self) -> float:
        """Prompts per second of sharded work (start-up and model loading excluded)."""
        return self.prompts_computed / self.dispatch_seconds if self.dispatch_seconds > 0 else 0.0


def option_identity(options: RunOptions, fmt: str) -> dict:
    """The part of the run's identity known before the model loads."""
    return dict(
        kn_ray_version=__version__,
        model=options.placement.model,
        attribution=options.attribution(),
        keep=options.as_dict()["keep"],
        input=dict(format=fmt, filters=options.filters.as_dict()),
        probe=options.probe.identity(),
    )


def run_record(options: RunOptions, fmt: str, info: dict, prompts: PromptSet) -> RunRecord:
    """run.json. Its plan is the pool the probe stage reads (every prompt of the input); which of
    them are attributed follows from the committed probe rows, so it is not part of the identity."""
    identity = option_identity(options, fmt)
    identity["model_info"] = {k: info[k] for k in ("revision", "masked", "num_layers", "num_neurons", "precision", "dtype")}
    pool = prompts.prompts
    identity["plan"] = dict(shard_size=options.shard_size or "auto", prompts=len(pool),
                            facts=len({p.fact_id for p in pool if p.fact_id}),
                            dropped_templates=prompts.dropped_templates, fingerprint=fingerprint([Shard(0, tuple(pool))]))
    recorded = dict(options.as_dict(), facts=public_uri(options.facts), output=public_uri(options.output))
    return RunRecord.of(identity, input_path=public_uri(options.facts), model_source=info["source"],
                        created=datetime.now(timezone.utc).isoformat(timespec="seconds"), options=recorded)


def file_metadata(record: RunRecord) -> dict:
    """What every Parquet part carries as key-value metadata (key `kn_ray`)."""
    ident = record.identity
    return dict(config_hash=record.config_hash, kn_ray_version=ident["kn_ray_version"], model=ident["model"],
                model_revision=ident["model_info"]["revision"], precision=ident["model_info"]["precision"],
                n_steps=ident["attribution"]["n_steps"], rule=ident["attribution"]["rule"], keep=ident["keep"],
                **{k: v for k, v in ident["attribution"].items() if k not in ("n_steps", "rule", "precision")})


def read_pool(options: RunOptions) -> tuple[FactSet, str]:
    """Every fact the filters admit (--max-facts-per-relation is applied after the probe, to known
    facts), and the input's format."""
    pool_filters = replace(options.filters, max_facts_per_relation=None)
    with tempfile.TemporaryDirectory(prefix="kn-ray-facts-") as scratch:
        facts_path = Path(local_copy(options.facts, scratch))
        fmt = detect_format(facts_path) if options.facts_format == "auto" else options.facts_format
        facts = read_facts(facts_path, fmt, pool_filters).require(public_uri(options.facts), options.filters)
    return facts, fmt


def chosen_prompts(prompts: list[PromptSpec], probe: ProbeResult, options: RunOptions,
                   input_order: list[str]) -> tuple[list[PromptSpec], set[str]]:
    """The prompts of the chosen known facts (with their probe fields; unknown ones skipped
    unless --attribute-unknown), the error rows of inputs that never became a fact; and the
    chosen facts."""
    policy, order = options.probe, fact_order(prompts, input_order)
    chosen = set(choose_facts(order, known_facts(probe.table, policy.min_known_prompts, policy.rule),
                              options.filters.max_facts_per_relation))
    probeable = {f for ids in order.values() for f in ids}
    mine = [s for s in prompts if s.fact_id in chosen or s.fact_id not in probeable]
    return with_probe(mine, probe.table, policy.attribute_unknown), chosen


def run_pipeline(options: RunOptions, *, progress: bool = True) -> RunSummary:
    options.check()
    start = time.perf_counter()
    facts, fmt = read_pool(options)
    run = RunDirectory(options.output)
    run.refuse_conflict(option_identity(options, fmt))  # before any model loads

    from .dispatch import DispatchResult
    from .execute import attribution_actors, run_shards
    from .executor import open_executor

    with open_executor(attribution_actors(options), options.resources) as pool:
        if progress:
            print(f"workers     {pool.plan}", file=sys.stderr, flush=True)
        info = pool.model_info()
        prompts = build_prompts(facts, masked=info["masked"], max_templates=options.filters.max_templates)
        prompts.require(public_uri(options.facts), options.placement.model)
        if options.mode == "circuits" and info["masked"]:
            raise ValueError("--mode circuits needs a causal LM (EAP-IG over pre-LN blocks)")
        record = run.open_run(run_record(options, fmt, info, prompts))
        workers_write = pool.shared_output(options.output)
        metadata = file_metadata(record)

        def dispatch(shards: list[Shard], desc: str, **kind):
            if not shards:
                return DispatchResult()
            with _progress_bar(sum(map(len, shards)), progress, desc) as bar:
                return run_shards(pool, shards, run, record.config_hash, options, metadata, bar,
                                  workers_write=workers_write, **kind)

        input_order = [f.fact_id for f in facts.facts]
        probe = run_probe(run, record.config_hash, options, prompts.prompts, input_order,
                          lambda shards: dispatch(shards, "probing", probe=True))
        selected, chosen = chosen_prompts(prompts.prompts, probe, options, input_order)
        if options.probe.probe_only or probe.failed:
            shards: list[Shard] = []
        else:
            if options.mode == "circuits":
                selected = with_candidates(selected)
            size = shard_size(options, run.summary("probe"), record.config_hash, len(selected), pool.count)
            shards = plan_shards(selected, size.value)
        run.write_summary("probe", probe_summary(options, probe, chosen, shards,
                                                 size if shards else None, record.config_hash))
        done = run.commits.finished([s.name for s in shards], record.config_hash)
        todo = [s for s in shards if s.name not in done]
        dispatch_start = time.perf_counter()
        result = dispatch(todo, "attributing")
        dispatch_seconds = time.perf_counter() - dispatch_start
    kept = {**run.commits.finished([s.name for s in probe.shards + shards], record.config_hash)}
    stale = run.commits.remove_stale(kept)
    counts = run.read("prompts", ["status"]).column("status").value_counts().to_pylist()
    failed = {**probe.failed, **result.failed}
    return RunSummary(str(run), len(shards), len(shards) - len(todo), len(result.written), failed,
                      probe.retries + result.retries, probe.actors_lost + result.actors_lost, result.prompts,
                      time.perf_counter() - start, dispatch_seconds, {c["values"]: c["counts"] for c in counts}, pool.plan,
                      stale, probe.actors_back + result.actors_back,
                      probe=probe_counts(probe, chosen, len(selected) if shards else 0))


@dataclass(frozen=True)
class ShardSize:
    value: int
    chosen_by: str  # shard_size (the option) | auto | recorded (an earlier run's, from probe.json)
    actors: int  # the pool's actors when the size was chosen


def shard_size(options: RunOptions, recorded: dict | None, run_hash: str, n_prompts: int, actors: int) -> ShardSize:
    """The attribution shards' size: --shard-size; else the size an earlier run of this run
    recorded in probe.json (so a resume on another cluster, with another actor count, plans the
    same shards); else `auto_shard_size` for the prompts and the pool's actors."""
    if options.shard_size:
        return ShardSize(options.shard_size, "shard_size", actors)
    plan = (recorded or {}).get("attribution_plan") or {}
    if plan.get("shards") and plan.get("config_hash") == run_hash and isinstance(plan.get("shard_size"), int):
        return ShardSize(plan["shard_size"], "recorded", plan.get("actors", actors))
    if plan.get("shards") and plan.get("shard_size") == "auto":
        # recorded before the actor count counted: the size then depended on the input alone
        return ShardSize(auto_shard_size(n_prompts), "recorded", 1)
    return ShardSize(auto_shard_size(n_prompts, actors), "auto", actors)


def probe_summary(options: RunOptions, probe: ProbeResult, chosen: set[str], shards: list[Shard],
                  size: ShardSize | None = None, run_hash: str = "") -> dict:
    """probe.json: the rule, per relation what the model knows, and the attribution plan that
    follows from it (empty for --probe-only or a failed probe): the shard size chosen (and by
    what; `actors`: the pool it was sized for), which a re-run of the run reuses (`shard_size`)."""
    plan = dict(shards=len(shards), prompts=sum(map(len, shards)), facts=len(chosen) if shards else 0,
                shard_size=size.value if size else options.shard_size or "auto",
                chosen_by=size.chosen_by if size else None, actors=size.actors if size else None,
                config_hash=run_hash, fingerprint=fingerprint(shards))
    return dict(rule=str(options.probe.rule), min_known_prompts=options.probe.min_known_prompts,
                attribute_unknown=options.probe.attribute_unknown,
                max_facts_per_relation=options.filters.max_facts_per_relation,
                shards=len(probe.shards), failed=sorted(probe.failed), attribution_plan=plan,
                relations=relation_summary(probe.table, options.probe.min_known_prompts, chosen))


def probe_counts(probe: ProbeResult, chosen: set[str], prompts_planned: int) -> dict:
    known = probe.table.column("known").to_pandas().fillna(False).astype(bool)
    return dict(prompts=probe.table.num_rows, known=int(known.sum()), facts_chosen=len(chosen),
                shards=len(probe.shards), written=probe.written, prompts_computed=probe.prompts_computed,
                seconds=round(probe.seconds, 3), prompts_planned=prompts_planned)


def _progress_bar(total: int, enabled: bool, desc: str = "attributing"):
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc=desc, disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
