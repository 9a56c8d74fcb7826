"""Running work on Ray: one pool of model-holding actors fed by the driver, used by
`kn-ray attribute` (shards) and `kn-ray edit` (work units).

* One actor per GPU (`num_gpus=1`) when the cluster has GPUs, else one CPU actor per group of
  up to 8 cores of a node, with a torch thread per core (`Resources`, `cpu_group`; GPU
  detection lives here only); each loads the model once. Ray restarts a crashed actor (`max_restarts`); the driver never lets Ray
  retry a shard behind its back (`max_task_retries=0`) but resubmits it itself, to any live
  actor, and counts attempts: after `max_attempts` failures the task is marked failed.
* After any failure the actor is pinged (`info()`, the one call Ray retries through restarts):
  a restarted actor answers once its model is loaded again, wherever Ray placed it (a node
  that replaced a lost one counts), and gets work again; a permanently dead one is dropped
  from the pool. Meanwhile the other actors take its work. When no actor is left, the driver
  waits `restart_wait` seconds for one to come back, then fails the remaining tasks: a lost
  node never hangs a run.
* Workers write, the driver commits: each attempt at a shard gets a fresh attempt id; the
  actor writes the shard's parts under names unique to that attempt straight to OUT and
  returns their names, row counts and sizes; the driver checks them and writes the shard's
  marker (`commit`). Exactly-once is decided in one place: one attempt per shard is in flight,
  one marker per shard names one attempt, and parts of other attempts are never read and are
  removed. A local OUT on a multi-node cluster is the exception: there the actors return
  Arrow tables and the driver writes them (no shared filesystem needed).
"""

from __future__ import annotations

import math
import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

if not os.environ.get("RAY_ADDRESS"):
    # A local cluster binds to loopback only: with clusters "disabled", Ray resolves its node
    # address to 127.0.0.1 instead of the machine's public IP (read when ray is imported).
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

import ray  # noqa: E402
from ray.exceptions import RayActorError, RayError, RayTaskError  # noqa: E402

from . import faults  # noqa: E402
from .options import Resources, RunOptions  # noqa: E402
from .circuit_tables import CIRCUIT_KINDS  # noqa: E402
from .plan import Shard  # noqa: E402
from .tables import KINDS  # noqa: E402
from .commit import CommitError, new_attempt  # noqa: E402
from .rundir import RunDirectory  # noqa: E402
from .worker import ShardComputer, ShardOutput  # noqa: E402

COMMIT_THREADS = 8  # concurrent marker writes (fsync locally, a PUT on object stores)


class ModelLoadError(ValueError):
    """No worker could load the model (a wrong name or path, usually)."""


@dataclass
class DispatchResult:
    written: list[str] = field(default_factory=list)  # keys of the tasks done
    failed: dict[str, str] = field(default_factory=dict)  # task key -> last error
    retries: int = 0
    actors_lost: int = 0  # calls that died with their actor (a crash, a lost node)
    actors_back: int = 0  # actors that answered again after such a loss (restarted, model reloaded)
    prompts: int = 0  # size of the tasks done (prompts, for shards)


def connect(min_cpus: float = 0) -> bool:
    """Join $RAY_ADDRESS, or start a fresh local loopback-only Ray (never a cluster that an earlier
    `ray start` left in Ray's current-cluster file, even a dead one); True if this call started it."""
    if ray.is_initialized():
        return False
    kwargs = dict(log_to_driver=False, logging_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)), include_dashboard=False,
                 **kwargs)
    return True


def disconnect() -> None:
    ray.shutdown()


def single_node() -> bool:
    """True if every actor runs on the driver's machine (a local OUT is then shared)."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


# Forwarded to the actors, so they reach the output filesystem as the driver does (Ray's
# runtime_env; never written to run.json or Parquet).
FORWARDED_ENV = (faults.ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
                 "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
                 "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


def actor_resources(res: Resources, gpus: float | None = None) -> tuple[int, dict]:
    """(number of actors, Ray options for each): one actor per `gpus` GPUs (default 1) on a GPU
    cluster, else by default one actor of `cpus_per_worker` CPUs (default `cpu_group()`) per that
    many of the cluster's CPUs (every core)."""
    cluster = ray.cluster_resources()
    gpus = gpus if gpus is not None else (1 if cluster.get("GPU", 0) >= 1 else 0)
    cpus = res.cpus_per_worker or (1 if gpus else cpu_group(res.workers, cluster.get("CPU", 1)))
    if res.workers:
        count = res.workers
    elif gpus:
        count = max(1, int(cluster.get("GPU", 0) // gpus))
    else:
        count = max(1, int(cluster.get("CPU", 1) // cpus))
    opts = dict(num_cpus=cpus, num_gpus=gpus, max_restarts=res.max_restarts, max_task_retries=0)
    env = {name: os.environ[name] for name in FORWARDED_ENV if os.environ.get(name)}
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return count, opts


MAX_CPU_GROUP = 8  # CPUs per default CPU actor: torch threads scale to about that many on one model


def cpu_group(workers: int | None = None, cluster_cpus: float = 1) -> int:
    """The default CPUs of a CPU actor: the smallest node's CPUs, in groups of at most MAX_CPU_GROUP
    (with a number of `workers`, also at most their share of the cluster's CPUs).
    One multi-threaded actor per group beats one single-threaded actor per core (BENCHMARKS.md,
    "The CPU default plan": a second thread speeds a pass up more than a second model copy does)
    and holds one copy of the model instead of one per core."""
    nodes = [node.get("Resources", {}).get("CPU", 0) for node in ray.nodes() if node.get("Alive")]
    smallest = int(min((n for n in nodes if n >= 1), default=1))
    group = smallest // math.ceil(smallest / MAX_CPU_GROUP)
    return max(1, min(group, int(cluster_cpus // workers)) if workers else group)


def describe_plan(count: int, opts: dict, chosen: bool, threads: int | None = None) -> str:
    """'2 actors x 1 CPU (1 torch thread each); why'."""
    what = f"{opts['num_gpus']:g} GPU" if opts["num_gpus"] else f"{opts['num_cpus']:g} CPU"
    n = threads or max(1, int(opts["num_cpus"]))
    threads = "" if opts["num_gpus"] and not threads else f" ({n} torch thread{'s' * (n > 1)} each)"
    why = "--workers" if chosen else ("one per GPU" if opts["num_gpus"] else "default: every CPU of the cluster")
    return f"{count} actor{'s' * (count != 1)} x {what}{threads}; {why}"


class ActorPool:
    """Actors of one class that each load the model once, their in-flight counts, and which are
    waiting on a health ping (`info()`). `actor_class(*args, threads=N, **kwargs)`: N torch
    threads (`threads`, else its logical CPUs on CPU actors, None on GPU actors); `gpus` per
    actor (`Placement.gpus_per_worker` and `.threads`)."""

    def __init__(self, actor_class, args: tuple, kwargs: dict, res: Resources, gpus: float | None = None,
                 threads: int | None = None):
        count, opts = actor_resources(res, gpus)
        self.plan = describe_plan(count, opts, bool(res.workers), threads)
        threads = threads or (None if opts["num_gpus"] else max(1, int(opts["num_cpus"])))
        remote = ray.remote(actor_class).options(**opts)
        self.limit, self.restart_wait = res.in_flight, res.restart_wait
        self.actors = [remote.remote(*args, threads=threads, **kwargs) for _ in range(count)]
        # healthy actor -> tasks in flight. An actor gets work only once its ping has answered: a
        # call queued on an actor still loading waits for it as long as it takes, forever if its
        # node is lost and none has room for it again.
        self.load: dict = {}
        self.pings = {_ping(a): a for a in self.actors}  # ref -> actor not yet known healthy
        self.lost: set = set()  # actors whose call died with them, not yet back
        self.back = 0  # how often a lost actor came back
        self.info: dict | None = None

    def model_info(self) -> dict:
        """The model as the first healthy actor loaded it; raises if no actor can load it."""
        error = None
        while self.info is None:
            if not self.pings:
                raise ModelLoadError(f"no worker could load the model: {error}")
            [ref], _ = ray.wait(list(self.pings), num_returns=1)
            error = self.answer(ref) or error
        return self.info

    def answer(self, ref) -> str | None:
        """Handle a ping reply: the actor is healthy again, or dropped; returns an error text."""
        actor = self.pings.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as error:
            self.drop(actor)
            return _short(error)
        if self.info is None:
            self.info = info
        elif [info.get(k) for k in ("revision", "precision", "dtype")] != [self.info.get(k) for k in ("revision", "precision", "dtype")]:
            self.drop(actor)
            return f"worker loaded revision {info.get('revision')} at {info.get('precision')}, " \
                   f"not {self.info.get('revision')}"
        self.load[actor] = 0
        if actor in self.lost:
            self.lost.discard(actor)
            self.back += 1
        return None

    def failed(self, actor) -> bool:
        """A call died with its actor: ping it before giving it more work (a dead actor fails the
        ping and is dropped). False if the actor was already being checked."""
        if actor not in self.load:
            return False
        del self.load[actor]
        self.lost.add(actor)
        self.pings[_ping(actor)] = actor
        return True

    def drop(self, actor) -> None:
        self.load.pop(actor, None)
        ray.kill(actor, no_restart=True)

    def free(self):
        """The least-busy healthy actor with room for another task, or None."""
        ready = [a for a, n in self.load.items() if n < self.limit]
        return min(ready, key=self.load.get) if ready else None

    def done(self, actor) -> None:
        if actor in self.load:
            self.load[actor] -= 1

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _ping(actor):
    """`actor.info()`, retried by Ray while the actor restarts (its node lost, its process
    crashed): it answers once the actor is back, or fails once it is gone for good."""
    return actor.info.options(max_task_retries=-1).remote()


class Dispatcher:
    """Feeds tasks to the pool and yields what comes back; resubmits what fails, to any live
    actor, up to `max_attempts` attempts per task (driver-side retries; Ray retries nothing).

    `call(actor, task) -> (ObjectRef, context)` submits one attempt; `results(tasks)` yields
    (task, value, context) per success. A consumer that rejects a value (a commit that fails)
    calls `retry(task, None, error)`; one attempt per task is ever in flight."""

    def __init__(self, pool: ActorPool, call, *, max_attempts: int, key=lambda task: task.name, size=len,
                 progress=None):
        self.pool, self.call, self.max_attempts, self.key, self.size = pool, call, max_attempts, key, size
        self.progress = progress
        self.result = DispatchResult()
        self.attempts: dict[str, int] = {}
        self.queue: deque = deque()

    def results(self, tasks):
        self.queue.extend(tasks)
        pending = {}
        while self.queue or pending:
            while self.queue and (actor := self.pool.free()) is not None:
                task = self.queue.popleft()
                ref, context = self.call(actor, task)
                pending[ref] = (task, actor, context)
                self.pool.load[actor] += 1
            # nothing in flight: only lost actors coming back could take the queue; wait for them, bounded
            waiting = list(pending) + list(self.pool.pings)
            ready = ray.wait(waiting, num_returns=1, timeout=None if pending else self.pool.restart_wait)[0] \
                if waiting else []
            if not ready:
                self.fail_queue(f"no worker came back within {self.pool.restart_wait:g} s" if waiting
                                else "no live workers left")
                break
            [ref] = ready
            if ref in self.pool.pings:
                self.pool.answer(ref)
                self.result.actors_back = self.pool.back
                continue
            task, actor, context = pending.pop(ref)
            try:
                value = ray.get(ref)
            except RayError as error:
                self.retry(task, actor, error)
                continue
            self.pool.done(actor)
            yield task, value, context

    def fail_queue(self, why: str) -> None:
        for task in self.queue:
            self.result.failed[self.key(task)] = why
            if self.progress is not None:
                self.progress.update(self.size(task))
        self.queue.clear()

    def succeeded(self, task) -> None:
        self.result.written.append(self.key(task))
        self.result.prompts += self.size(task)
        if self.progress is not None:
            self.progress.update(self.size(task))

    def retry(self, task, actor, error: Exception) -> None:
        """Count a failed attempt (the actor's call died or its result was rejected): requeue the
        task, or fail it after `max_attempts`."""
        if isinstance(error, RayActorError):
            self.result.actors_lost += self.pool.failed(actor)
        elif actor is not None:
            self.pool.done(actor)
        key = self.key(task)
        n = self.attempts[key] = self.attempts.get(key, 0) + 1
        if n >= self.max_attempts:
            self.result.failed[key] = f"failed {n} attempts; last: {_short(error)}"
            if self.progress is not None:
                self.progress.update(self.size(task))
        else:
            self.result.retries += 1
            self.queue.appendleft(task)


class TasksFailed(RuntimeError):
    """Some tasks failed `max_attempts` times (the message lists them)."""


def run_tasks(actor_class, args: tuple, kwargs: dict, res: Resources, tasks, *, method: str = "run",
              key=lambda task: task.name, size=lambda task: 1, gpus: float | None = None,
              threads: int | None = None):
    """Yield (task, result) of `actor_class(*args, **kwargs).<method>(task)` over a pool, as they
    finish; raises TasksFailed at the end if a task failed on every attempt. Starts a local Ray
    (or joins $RAY_ADDRESS) if none is running."""
    started = connect(min_cpus=res.cpus_needed)
    pool = None
    try:
        pool = ActorPool(actor_class, args, kwargs, res, gpus, threads)
        pool.model_info()
        dispatcher = Dispatcher(pool, lambda actor, task: (getattr(actor, method).remote(task), None),
                                max_attempts=res.max_attempts, key=key, size=size)
        for task, value, _ in dispatcher.results(list(tasks)):
            dispatcher.succeeded(task)
            yield task, value
        if dispatcher.result.failed:
            raise TasksFailed("; ".join(f"{k}: {why}" for k, why in sorted(dispatcher.result.failed.items())))
    finally:
        if pool is not None:
            pool.shutdown()
        if started:
            disconnect()


# ---- attribution: shards, written by the workers, committed by the driver -------------------------
def attribution_pool(options: RunOptions) -> ActorPool:
    p = options.placement
    return ActorPool(ShardComputer, (p,), {}, options.resources, p.gpus_per_worker, p.threads)


def run_shards(pool: ActorPool, shards: list[Shard], run: RunDirectory, run_hash: str, options: RunOptions,
               metadata: dict, progress=None, workers_write: bool = True) -> DispatchResult:
    """Compute `shards` and commit each: the actor writes an attempt's parts (or returns tables
    the driver writes), the driver checks them and writes the marker. Commits run on a few
    driver threads, so a marker's fsync or PUT latency never holds up the dispatch loop; a
    failed commit sends its shard back to the queue."""

    def call(actor, shard: Shard):
        attempt = new_attempt()
        meta = dict(metadata, shard=shard.shard_id, attempt=attempt)
        output = ShardOutput(run.uri, shard.name, attempt, meta) if workers_write else None
        o = options
        return actor.compute.remote(shard.shard_id, list(shard.prompts), o.n_steps, o.method, o.keep, output,
                                   **o.engine_extra()), \
            (attempt, meta)

    def commit(shard: Shard, out: dict, attempt: str, meta: dict) -> None:
        parts = out["parts"] if "parts" in out else run.commits.write_parts(shard.name, attempt, out["tables"], meta)
        run.commits.commit(shard.name, attempt, parts, run_hash, CIRCUIT_KINDS if options.mode == "circuits" else KINDS)

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
            for shard, out, (attempt, meta) in dispatcher.results(todo):
                futures[committers.submit(commit, shard, out, attempt, meta)] = shard
                settle(futures, block=False)
            todo = []
            settle(futures, block=True)  # a failed commit requeues its shard: go round again
    return dispatcher.result


def _short(error: BaseException) -> str:
    """One line: the exception raised in a task or actor constructor (the traceback's last line),
    else what happened to the actor (the first line)."""
    text = str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()] or [type(error).__name__]
    raised = isinstance(error, RayTaskError) or "creation task" in lines[0]
    return (lines[-1] if raised else lines[0]).strip()[:300]

