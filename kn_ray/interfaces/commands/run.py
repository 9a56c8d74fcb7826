"""`kn-ray run JOB.yaml`: run one declarative job spec (see docs/pipeline.md).

Runs on $RAY_ADDRESS when set, else on a fresh local Ray bound to 127.0.0.1."""

from __future__ import annotations

from dataclasses import dataclass

from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import Progress, add_command


@dataclass(frozen=True)
class JobRun:
    spec: str = option(help="job spec YAML: a path or URI (s3://bucket/job.yaml)", positional=True)
    output: str | None = option(None, "override the spec's output directory (a path or URI, e.g. s3://bucket/run)",
                                aliases=("-o",))
    facts: str | None = option(None, "override the spec's facts (a path or URI)")

    def overrides(self) -> dict:
        """The spec keys this run overrides."""
        return {key: value for key, value in (("output", self.output), ("facts", self.facts)) if value}


def register(sub) -> None:
    p = add_command(sub, "run", run, help="run a job spec (jobs/*.yaml) on Ray", description=__doc__)
    declared.add_flags(p, JobRun)
    declared.add_flags(p, Progress)


def run(args) -> int:
    from kn_ray.interfaces.jobs import load_job, run_and_summarise

    job = declared.from_args(JobRun, args)
    options = load_job(job.spec, job.overrides() or None)
    return run_and_summarise(options, progress=Progress.apply(args))
