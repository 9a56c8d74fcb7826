"""`kn-ray submit JOB.yaml --address URL`: run a job spec as a Ray Job and follow its logs."""

from __future__ import annotations

import shlex
import sys
import time
from pathlib import Path

EXCLUDES = [".venv/", ".git/", "out/", "**/__pycache__/", "*.parquet", "*.egg-info/"]
TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}


def register(sub) -> None:
    p = sub.add_parser("submit", help="submit a job spec to a Ray cluster as a Ray Job and follow it",
                       description="Uploads --working-dir (a local spec must lie inside it), runs `kn-ray run SPEC` on "
                                   "the cluster (kn-ray must be installed in the cluster's image), streams the "
                                   "logs, and exits non-zero unless the job succeeds.")
    p.add_argument("spec", help="job spec YAML: a path inside --working-dir, or a URI the cluster reads (s3://...)")
    p.add_argument("--address", required=True, help="Ray dashboard address, e.g. http://127.0.0.1:8265")
    p.add_argument("--working-dir", default=".", help="directory uploaded as the job's working dir (default: .)")
    p.add_argument("--output", "-o", help="override the spec's output: a URI (s3://bucket/run, gs://...) or an "
                                          "absolute path on the cluster's head node")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE", help="environment variable for the job")
    p.add_argument("--no-wait", action="store_true", help="print the job id and return")
    p.set_defaults(func=run)


def entrypoint(spec: str | Path, working_dir: Path, output: str | None) -> str:
    """The job's command. A local spec is named relative to the uploaded working dir (it must lie
    inside it), a spec URI as it is; the output must be a URI or an absolute path (a relative one
    would land in Ray's temporary copy of the working dir)."""
    from kn_ray.interfaces.jobs import load_job
    from kn_ray.pipeline.rundir import is_uri

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

    working_dir = Path(args.working_dir)
    command = entrypoint(args.spec, working_dir, args.output)
    bad = [item for item in args.env if "=" not in item]
    if bad:
        raise ValueError(f"--env takes KEY=VALUE, got {bad[0]!r}")
    env = dict(item.split("=", 1) for item in args.env)
    client = JobSubmissionClient(args.address)
    job_id = client.submit_job(entrypoint=command, runtime_env={
        "working_dir": str(working_dir), "excludes": EXCLUDES, "env_vars": env})
    print(f"submitted {job_id}: {command}", flush=True)
    if args.no_wait:
        return 0
    try:
        status = follow(client, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; the job keeps running (ray job stop {job_id} --address {args.address})")
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
