"""`kn-ray attribute`: find knowledge neurons (or, with --mode circuits, circuit edges) for a fact set, sharded on Ray, into Parquet.

Runs on $RAY_ADDRESS when set, else on a fresh local Ray bound to 127.0.0.1 ($KN_RAY_START_TIMEOUT:
seconds its raylet may take to start); `--executor local` runs the shards in this process, without
Ray. Re-running the same command resumes (with either executor); another configuration on the same --output is refused. The flags are
RunOptions' declared options (kn_ray.pipeline.options), the same as a job spec's keys."""

from __future__ import annotations

from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import Progress, add_command
from kn_ray.pipeline.options import RunOptions

GROUPS = {"filters": "filters", "probe": "what the model knows (probed first)", "attribution": "attribution", "trace": "causal tracing (--mode trace)", "keep": "kept rows", "workers": "workers"}


def register(sub) -> None:
    p = add_command(sub, "attribute", run, description=__doc__,
                    help="attribute facts to FFN neurons (knowledge neurons) or circuit edges (--mode circuits) "
                         "on Ray; write Parquet (resumable)")
    declared.add_flags(p, RunOptions, GROUPS)
    declared.add_flags(p, Progress)


def spec_from_args(args) -> dict:
    """The job-spec mapping the flags describe (unset flags are left to the defaults)."""
    return declared.spec_from_args(RunOptions, args)


def run(args) -> int:
    from kn_ray.interfaces.jobs import options_from_spec, run_and_summarise

    return run_and_summarise(options_from_spec(spec_from_args(args)), progress=Progress.apply(args))
