"""Edit work units on the pipeline's actor pool (`kn_ray.pipeline.pool`, fed by `.dispatch`; the only edit module
that imports ray).

The same pool as attribution: one actor per `gpus_per_worker` GPUs when the cluster has GPUs, else CPU actors of
`cpus_per_worker` CPUs with as many torch threads; each loads the model once. Failures are
handled as in attribution: Ray retries nothing, the driver resubmits a unit whose actor died
(after a health ping) or whose experiment raised, to any live actor, up to `max_attempts`
attempts; a unit is deterministic and undoes its edits, so a rerun gives the same rows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from kn_ray.pipeline import faults
from kn_ray.pipeline.dispatch import run_tasks
from kn_ray.pipeline.options import Resources
from kn_ray.pipeline.pool import ActorSpec
from kn_ray.placement import Placement
from kn_ray.stages.edit.corpus import WorkUnit
from kn_ray.stages.edit.experiments import EditRunner


class EditWorker:
    def __init__(self, placement: Placement, threads: int | None = None):
        self.runner = EditRunner.load(placement.for_actor(threads))

    def info(self) -> dict:
        """What the pool checks every actor loaded alike (and pings after a failure)."""
        lm = self.runner.lm
        return dict(name=lm.name, revision=lm.revision, precision=self.runner.prober.precision, device=str(lm.device))

    def run(self, unit: WorkUnit):
        faults.before_task(unit.index)
        rows = self.runner.run(unit)
        faults.after_task()
        return rows


def run_units(units: Sequence[WorkUnit], placement: Placement, workers: int) -> Iterator[tuple[WorkUnit, object]]:
    """Yield (unit, its rows) as units finish on `workers` actors of attribution's default
    `Resources`; raises `TasksFailed` at the end if a unit failed on every attempt."""
    spec = ActorSpec(EditWorker, (placement,), gpus=placement.gpus_per_worker, threads=placement.threads)
    yield from run_tasks(spec, Resources(workers=workers), units, key=lambda unit: f"{unit.op}-{unit.index:05d}")
