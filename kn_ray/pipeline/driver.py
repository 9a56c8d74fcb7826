"""One attribution run end to end: facts -> plan -> run.json -> shards on Ray -> report.

Ray is imported only when the run starts (`execute`), so facts, plans and the store stay
usable without it. Re-running the same command resumes: shards whose files are whole are
skipped; a different configuration against the same output directory is refused.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from kn_ray import __version__

from .facts import detect_format, read_facts
from .options import RunOptions
from .plan import Shard, fingerprint, plan_shards
from .prompts import build_prompts
from .store import Store, config_hash


@dataclass
class RunReport:
    output: Path
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
        model=options.model,
        attribution=options.attribution(),
        keep=options.as_dict()["keep"],
        input=dict(format=fmt, filters=options.filters.as_dict()),
    )


def run_record(options: RunOptions, fmt: str, info: dict, shards: list[Shard], dropped: int) -> dict:
    identity = option_identity(options, fmt)
    identity["model_info"] = {k: info[k] for k in ("revision", "masked", "num_layers", "num_neurons", "precision")}
    identity["plan"] = dict(shard_size=options.shard_size, shards=len(shards), prompts=sum(map(len, shards)),
                            facts=len({p.fact_id for s in shards for p in s.prompts if p.fact_id}),
                            dropped_templates=dropped, fingerprint=fingerprint(shards))
    return dict(identity=identity, config_hash=config_hash(identity), input_path=str(Path(options.facts).resolve()),
                model_source=info["source"], created=datetime.now(timezone.utc).isoformat(timespec="seconds"),
                options=options.as_dict())


def file_metadata(record: dict) -> dict:
    """What every Parquet part carries as key-value metadata (key `kn_ray`)."""
    ident = record["identity"]
    return dict(config_hash=record["config_hash"], kn_ray_version=ident["kn_ray_version"], model=ident["model"],
                model_revision=ident["model_info"]["revision"], precision=ident["model_info"]["precision"],
                n_steps=ident["attribution"]["n_steps"], method=ident["attribution"]["method"], keep=ident["keep"])


def run_pipeline(options: RunOptions, *, progress: bool = True) -> RunReport:
    options.check()
    start = time.perf_counter()
    fmt = detect_format(Path(options.facts)) if options.facts_format == "auto" else options.facts_format
    facts = read_facts(options.facts, fmt, options.filters)
    store = Store(options.output)
    store.refuse_conflict(option_identity(options, fmt))  # before any model loads

    from .execute import Dispatcher, WorkerPool, connect, disconnect

    res = options.resources
    started = connect(min_cpus=(res.workers or 1) * res.cpus_per_worker)
    try:
        pool = WorkerPool(options)
        try:
            info = pool.model_info()
            prompts = build_prompts(facts, masked=info["masked"], max_templates=options.filters.max_templates)
            shards = plan_shards(prompts.prompts, options.shard_size)
            record = store.open_run(run_record(options, fmt, info, shards, prompts.dropped_templates))
            todo = [s for s in shards if not store.finished(s.name, record["config_hash"])]
            dispatch_start = time.perf_counter()
            with _progress_bar(sum(map(len, todo)), progress) as bar:
                result = Dispatcher(pool, store, options, file_metadata(record), bar).run(todo)
            dispatch_seconds = time.perf_counter() - dispatch_start
        finally:
            pool.shutdown()
    finally:
        if started:
            disconnect()
    counts = store.read("prompts", ["status"]).column("status").value_counts().to_pylist()
    return RunReport(Path(options.output), len(shards), len(shards) - len(todo), len(result.written), result.failed,
                     result.retries, result.actors_lost, result.prompts, time.perf_counter() - start, dispatch_seconds,
                     {c["values"]: c["counts"] for c in counts})


def _progress_bar(total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, unit="prompt", desc="attributing", disable=not enabled, dynamic_ncols=True,
                smoothing=0.1)
