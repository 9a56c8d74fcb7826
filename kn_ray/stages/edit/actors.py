"""Edit work units on Ray actors that each hold the loaded model (the only edit module that
imports ray).

Same resource model as attribution (`kn_ray.pipeline.execute`): one actor per GPU
(`num_gpus=1`) when the cluster has GPUs, else CPU actors with `cpus_per_worker` logical
CPUs and as many torch threads. Each actor loads the model once. A unit is deterministic and
its edits are undone inside the unit, so Ray may rerun it on a restarted actor
(`max_task_retries`); an exception raised by the experiment itself is not retried.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import replace

import ray

from kn_ray.pipeline.execute import connect
from kn_ray.stages.edit.runner import ModelSpec
from kn_ray.stages.edit.corpus import WorkUnit


class EditWorker:
    def __init__(self, spec: ModelSpec):
        self.runner = spec.runner()

    def run(self, unit: WorkUnit):
        return self.runner.run(unit)


def run_units(units: Sequence[WorkUnit], spec: ModelSpec, workers: int, *, cpus_per_worker: float = 1.0,
              in_flight: int = 2, max_restarts: int = 2) -> Iterator[tuple[WorkUnit, object]]:
    """Yield (unit, its rows) as units finish, `in_flight` queued per actor."""
    started = connect(min_cpus=workers * cpus_per_worker)
    actors = []
    try:
        gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
        threads = None if gpus else max(1, int(cpus_per_worker))
        remote = ray.remote(EditWorker).options(num_cpus=cpus_per_worker, num_gpus=gpus, max_restarts=max_restarts,
                                                max_task_retries=max_restarts)
        actors = [remote.remote(replace(spec, threads=threads)) for _ in range(workers)]
        load = {actor: 0 for actor in actors}
        queue, pending = deque(units), {}
        while queue or pending:
            while queue and load[actor := min(load, key=load.get)] < in_flight:
                unit = queue.popleft()
                pending[actor.run.remote(unit)] = (unit, actor)
                load[actor] += 1
            [ref], _ = ray.wait(list(pending), num_returns=1)
            unit, actor = pending.pop(ref)
            load[actor] -= 1
            yield unit, ray.get(ref)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
        if started:
            ray.shutdown()
