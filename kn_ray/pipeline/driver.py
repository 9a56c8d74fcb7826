"""One attribution run end to end: facts -> plan -> run.json -> shards on Ray -> summary.

Ray is imported only when the run starts (`ray_env.prepare`, then `pool`, `execute`), so
facts, plans and the run directory stay usable without it. Re-running the same command
resumes: shards whose files are whole are skipped; a different configuration against the same
output directory is refused. `--facts` and `--output` may be URIs (`uris.filesystem`); facts on
an object store are copied to a temporary local directory first.
"""

from __future__ import annotations

import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kn_ray import __version__

from . import ray_env
from .facts import detect_format, read_facts
from .options import RunOptions
from .plan import Shard, auto_shard_size, fingerprint, plan_shards
from .corrupt import with_candidates
from .prompts import build_prompts
from .record import RunRecord
from .rundir import RunDirectory
from .uris import is_local, local_copy, public_uri


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
    )


def run_record(options: RunOptions, fmt: str, info: dict, shards: list[Shard], dropped: int) -> RunRecord:
    identity = option_identity(options, fmt)
    identity["model_info"] = {k: info[k] for k in ("revision", "masked", "num_layers", "num_neurons", "precision", "dtype")}
    n_prompts = sum(map(len, shards))
    identity["plan"] = dict(shard_size=options.shard_size or auto_shard_size(n_prompts), shards=len(shards),
                            prompts=n_prompts,
                            facts=len({p.fact_id for s in shards for p in s.prompts if p.fact_id}),
                            dropped_templates=dropped, fingerprint=fingerprint(shards))
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


def run_pipeline(options: RunOptions, *, progress: bool = True) -> RunSummary:
    options.check()
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kn-ray-facts-") as scratch:
        facts_path = Path(local_copy(options.facts, scratch))
        fmt = detect_format(facts_path) if options.facts_format == "auto" else options.facts_format
        facts = read_facts(facts_path, fmt, options.filters).require(public_uri(options.facts), options.filters)
    run = RunDirectory(options.output)
    run.refuse_conflict(option_identity(options, fmt))  # before any model loads

    ray_env.prepare()  # before Ray is imported
    from .execute import attribution_actors, run_shards
    from .pool import open_pool
    from .ray_cluster import single_node

    with open_pool(attribution_actors(options), options.resources) as pool:
        if progress:
            print(f"workers     {pool.plan}", file=sys.stderr, flush=True)
        info = pool.model_info()
        prompts = build_prompts(facts, masked=info["masked"], max_templates=options.filters.max_templates)
        prompts.require(public_uri(options.facts), options.placement.model)
        if options.mode == "circuits":
            if info["masked"]:
                raise ValueError("--mode circuits needs a causal LM (EAP-IG over pre-LN blocks)")
            prompts.prompts = with_candidates(prompts.prompts)
        shards = plan_shards(prompts.prompts, options.shard_size or auto_shard_size(len(prompts.prompts)))
        record = run.open_run(run_record(options, fmt, info, shards, prompts.dropped_templates))
        done = run.commits.finished([s.name for s in shards], record.config_hash)
        stale = run.commits.remove_stale(done)
        todo = [s for s in shards if s.name not in done]
        dispatch_start = time.perf_counter()
        with _progress_bar(sum(map(len, todo)), progress) as bar:
            result = run_shards(pool, todo, run, record.config_hash, options, file_metadata(record), bar,
                                workers_write=not is_local(options.output) or single_node())
        dispatch_seconds = time.perf_counter() - dispatch_start
    stale += run.commits.remove_stale(run.commits.markers(record.config_hash))
    counts = run.read("prompts", ["status"]).column("status").value_counts().to_pylist()
    return RunSummary(str(run), len(shards), len(shards) - len(todo), len(result.written), result.failed,
                     result.retries, result.actors_lost, result.prompts, time.perf_counter() - start, dispatch_seconds,
                     {c["values"]: c["counts"] for c in counts}, pool.plan, stale, result.actors_back)


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="attributing", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
