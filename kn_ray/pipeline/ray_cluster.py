"""The Ray cluster: joining it (or starting a local one), and sizing the actors to it.

* One actor per GPU (`num_gpus=1`) when the cluster has GPUs, else one CPU actor per group of
  up to 8 cores of a node, with a torch thread per core (`actor_resources`, `cpu_group`; GPU
  detection lives here only).
* A local cluster binds to loopback only (`ray_env.prepare`, before Ray is imported).
"""

from __future__ import annotations

import contextlib
import math
import os
import time

import ray

from .options import Resources
from .ray_env import forwarded, start_timeout

START_POLL = 0.5  # seconds between polls for a starting raylet (`start_window`)
MAX_CPU_GROUP = 8  # CPUs per default CPU actor: torch threads scale to about that many on one model

@contextlib.contextmanager
def connected(min_cpus: float = 0):
    """Ray for the block: $RAY_ADDRESS joined, or a fresh local Ray started (never
    a cluster that an earlier `ray start` left in Ray's current-cluster file, even a dead one)
    and shut down after it; a Ray already initialised in this process is used as it is."""
    if ray.is_initialized():
        yield
        return
    kwargs = dict(log_to_driver=False, logging_level="WARNING")
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], **kwargs)
    else:
        with start_window(start_timeout()):
            ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(min_cpus)), include_dashboard=False,
                     **kwargs)
    try:
        yield
    finally:
        ray.shutdown()


@contextlib.contextmanager
def start_window(seconds: float | None):
    """A local Ray started in the block may take `seconds` (None: Ray's own 30 s) to register its
    node. Ray's `Node` polls `services.get_node` until its raylet has registered, giving up after
    a fixed 30 s; here each poll retries until `seconds` after the first, so a raylet slowed by
    a loaded machine has that long. The longer of the two windows applies."""
    from ray._private import services

    original = getattr(services, "get_node", None)
    if seconds is None or original is None:  # unset, or a Ray without the hook: Ray's window
        yield
        return
    deadline: list[float] = []

    def get_node(*args, **kwargs):
        if not deadline:
            deadline.append(time.monotonic() + seconds)
        while True:
            try:
                return original(*args, **kwargs)
            except RuntimeError:  # not registered yet
                if time.monotonic() >= deadline[0]:
                    raise
                time.sleep(START_POLL)

    services.get_node = get_node
    try:
        yield
    finally:
        services.get_node = original


def single_node() -> bool:
    """True if every actor runs on the driver's machine (a local OUT is then shared)."""
    return sum(1 for node in ray.nodes() if node.get("Alive")) <= 1


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
    env = forwarded()
    if env:
        opts["runtime_env"] = {"env_vars": env}
    return count, opts


def cpu_group(workers: int | None = None, cluster_cpus: float = 1) -> int:
    """The default CPUs of a CPU actor: the smallest node's CPUs, in groups of at most MAX_CPU_GROUP
    (with a number of `workers`, also at most their share of the cluster's CPUs).
    One multi-threaded actor per group holds one copy of the model instead of one per core, and
    uses every core of a small run even with one shard; on runs of many shards of a small model, one single-threaded
    actor per core can be faster (BENCHMARKS.md, "The CPU default plan": SmolLM2, 88% of it)."""
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
