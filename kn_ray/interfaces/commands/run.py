"""`kn-ray run JOB.yaml`: run one declarative job spec (see docs/pipeline.md)."""

from __future__ import annotations

from kn_ray.interfaces.commands import add_progress_flag


def register(sub) -> None:
    p = sub.add_parser("run", help="run a job spec (jobs/*.yaml) on Ray",
                       description="Runs on $RAY_ADDRESS when set, else on a fresh local Ray bound to 127.0.0.1.")
    p.add_argument("spec", help="job spec YAML: a path or URI (s3://bucket/job.yaml)")
    p.add_argument("--output", "-o", help="override the spec's output directory (a path or URI, e.g. s3://bucket/run)")
    p.add_argument("--facts", help="override the spec's facts (a path or URI)")
    add_progress_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.interfaces.jobs import load_job, run_and_report

    overrides = {key: value for key, value in (("output", args.output), ("facts", args.facts)) if value}
    options = load_job(args.spec, overrides or None)
    return run_and_report(options, progress=not args.no_progress)
