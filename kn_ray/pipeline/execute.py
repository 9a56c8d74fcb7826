"""Attribution shards: computed by a pool of `ShardComputer` workers (Ray actors, or one in this
process: `executor`; fed by `dispatch`), written by the workers and committed by the driver.

Each attempt at a shard gets a fresh attempt id; the actor writes the shard's parts under names
unique to that attempt straight to OUT and returns their names, row counts and sizes
(`worker.ShardResult`); the driver checks them and writes the shard's marker (`commit`).
Exactly-once is decided in one place: one attempt per shard is in flight, one marker per shard
names one attempt, and parts of other attempts are never read and are removed. A local OUT on a
multi-node cluster is the exception: there the actors return Arrow tables and the driver writes
them (no shared filesystem needed).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from .circuit_tables import CIRCUIT_KINDS
from .known import PROBE_KINDS
from .commit import CommitError, new_attempt
from .dispatch import Dispatcher, DispatchResult
from .options import RunOptions
from .plan import Shard
from .executor import ActorSpec
from .rundir import RunDirectory
from .neuron_tables import KINDS
from .trace_tables import TRACE_KINDS
from .worker import ShardComputer, ShardOutput, ShardResult

MODE_KINDS = {"neurons": KINDS, "circuits": CIRCUIT_KINDS, "trace": TRACE_KINDS}  # the tables a shard commits
COMMIT_THREADS = 8  # concurrent marker writes (fsync locally, a PUT on object stores)


def attribution_actors(options: RunOptions) -> ActorSpec:
    p = options.placement
    return ActorSpec(ShardComputer, (p,), gpus=p.gpus_per_worker, threads=p.threads)


def run_shards(pool, shards: list[Shard], run: RunDirectory, run_hash: str, options: RunOptions,
               metadata: dict, progress=None, workers_write: bool = True, probe: bool = False) -> DispatchResult:
    """Compute `shards` and commit each: the actor writes an attempt's parts (or returns tables
    the driver writes), the driver checks them and writes the marker. Commits run on a few
    driver threads, so a marker's fsync or PUT latency never holds up the dispatch loop; a
    failed commit sends its shard back to the queue. `probe`: the probe stage's forward passes
    instead of the run's mode."""
    kinds = PROBE_KINDS if probe else MODE_KINDS[options.mode]
    extra = dict(mode="probe", known=str(options.probe.rule)) if probe else options.engine_extra()

    def call(actor, shard: Shard):
        attempt = new_attempt()
        meta = dict(metadata, shard=shard.shard_id, attempt=attempt)
        output = ShardOutput(run.uri, shard.name, attempt, meta) if workers_write else None
        o = options
        return pool.submit(actor, "compute", shard.shard_id, list(shard.prompts), o.n_steps, o.rule, o.keep, output,
                           **extra), (attempt, meta)

    def commit(shard: Shard, result: ShardResult, attempt: str, meta: dict) -> None:
        parts = result.parts if result.parts is not None else \
            run.commits.write_parts(shard.name, attempt, result.tables, meta)
        run.commits.commit(shard.name, attempt, parts, run_hash, kinds)

    def settle(futures: dict, block: bool) -> None:
        done = list(futures) if block else [f for f in futures if f.done()]
        for future in done:
            shard = futures.pop(future)
            try:
                future.result()
            except (CommitError, OSError) as error:
                dispatcher.retry(shard, None, error)
            else:
                dispatcher.succeeded(shard)

    dispatcher = Dispatcher(pool, call, max_attempts=options.resources.max_attempts, progress=progress)
    futures: dict = {}
    with ThreadPoolExecutor(COMMIT_THREADS) as committers:
        todo = list(shards)
        while todo or dispatcher.queue:
            for shard, result, (attempt, meta) in dispatcher.results(todo):
                futures[committers.submit(commit, shard, result, attempt, meta)] = shard
                settle(futures, block=False)
            todo = []
            settle(futures, block=True)  # a failed commit requeues its shard: go round again
    return dispatcher.result
