"""`kn-ray submit JOB.yaml --address URL`: run a job spec as a Ray Job and follow its logs.

Uploads --working-dir (a local spec must lie inside it), runs `kn-ray run SPEC` on the cluster
(kn-ray must be installed in the cluster's image), streams the logs, and exits non-zero unless
the job succeeds."""

from __future__ import annotations

import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import add_command

EXCLUDES = [".venv/", ".git/", "out/", "**/__pycache__/", "*.parquet", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


@dataclass(frozen=True)
class Submission:
    spec: str = option(help="job spec YAML: a path inside --working-dir, or a URI the cluster reads (s3://...)",
                       positional=True)
    address: str = option(help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    working_dir: str = option(".", "directory uploaded as the job's working dir")
    output: str | None = option(None, "override the spec's output: a URI (s3://bucket/run, gs://...) or an absolute "
                                      "path on the cluster's head node", aliases=("-o",))
    env: tuple[str, ...] = option((), "environment variable for the job (repeatable)", action="append",
                                  metavar="KEY=VALUE")
    no_wait: bool = option(False, "print the job id and return")

    def environment(self) -> dict[str, str]:
        bad = [item for item in self.env if "=" not in item]
        if bad:
            raise ValueError(f"--env takes KEY=VALUE, got {bad[0]!r}")
        return dict(item.split("=", 1) for item in self.env)


def register(sub) -> None:
    p = add_command(sub, "submit", run, description=__doc__,
                    help="submit a job spec to a Ray cluster as a Ray Job and follow it")
    declared.add_flags(p, Submission)


def entrypoint(spec: str | Path, working_dir: Path, output: str | None) -> str:
    """The job's command. A local spec is named relative to the uploaded working dir (it must lie
    inside it), a spec URI as it is; the output must be a URI or an absolute path (a relative one
    would land in Ray's temporary copy of the working dir)."""
    from kn_ray.interfaces.jobs import load_job
    from kn_ray.pipeline.uris import is_uri

    if is_uri(spec):
        where = str(spec)
    else:
        try:
            where = Path(spec).resolve().relative_to(working_dir.resolve()).as_posix()
        except ValueError:
            raise ValueError(f"{spec} is not inside the working dir {working_dir}; pass --working-dir") from None
    options = load_job(spec, {"output": output} if output else None)
    if not (is_uri(options.output) or Path(options.output).is_absolute()):
        raise ValueError(f"output {options.output!r} is relative; give an absolute path on the cluster (--output)")
    command = f"python -m kn_ray.interfaces.cli run {shlex.quote(where)} --no-progress"
    return command + (f" --output {shlex.quote(output)}" if output else "")


def run(args) -> int:
    from ray.job_submission import JobSubmissionClient

    job = declared.from_args(Submission, args)
    working_dir = Path(job.working_dir)
    command = entrypoint(job.spec, working_dir, job.output)
    env = job.environment()
    client = JobSubmissionClient(job.address)
    job_id = client.submit_job(entrypoint=command, runtime_env={
        "working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env})
    print(f"submitted {job_id}: {command}", flush=True)
    if job.no_wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (ray job stop {job_id} --address {job.address})")
        return 130
    print(f"job {job_id} {status}", flush=True)
    return 0 if status == "SUCCEEDED" else 1


def follow(client, job_id: str, poll: float = 1.0) -> str:
    """Print the job's logs as they grow until it ends; returns its final status."""
    printed = 0
    while True:
        status = str(client.get_job_status(job_id).value)
        logs = client.get_job_logs(job_id)
        sys.stdout.write(logs[printed:])
        sys.stdout.flush()
        printed = len(logs)
        if status in TERMINAL:
            return status
        time.sleep(poll)
