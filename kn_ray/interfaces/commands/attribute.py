"""`kn-ray attribute`: find knowledge neurons for a fact set, sharded on Ray, into Parquet."""

from __future__ import annotations

import argparse

from kn_ray.choices import DTYPES, PRECISIONS

AUTO = "auto"  # kn_ray.engine.quadrature.AUTO; the engine (torch) is imported only when a command runs


def register(sub) -> None:
    p = sub.add_parser("attribute", help="attribute facts to FFN neurons on Ray; write Parquet (resumable)",
                       description="Runs on $RAY_ADDRESS when set, else on a local Ray bound to 127.0.0.1. "
                                   "Re-running the same command resumes; another configuration on the same "
                                   "--output is refused.")
    p.add_argument("--model", required=True, help="hub id, checkpoint dir, .gguf file or embedded name (smollm2)")
    p.add_argument("--facts", required=True, help="PARAREL-layout dir, JSON Lines file (path or URI), or builtin:demo")
    p.add_argument("--output", "-o", required=True,
                   help="output directory: a path or URI (file://, s3://, gs://, any pyarrow.fs/fsspec filesystem)")
    p.add_argument("--format", choices=("auto", "pararel", "jsonl"), help="facts format (default: auto)")
    p.add_argument("--revision", help="model revision (hub)")
    p.add_argument("--allow-pickle", action="store_true", default=None, help="allow pickle weights (trusted sources)")
    p.add_argument("--trust-remote-code", action="store_true", default=None)
    m = p.add_argument_group("model placement")
    m.add_argument("--dtype", choices=DTYPES,
                   help="weights (default auto: bf16 on bf16 GPUs when precision is bf16/auto, else fp32)")
    m.add_argument("--max-memory", help="per actor, Accelerate's max_memory as device=size pairs: 0=70GiB,1=70GiB,cpu=200GiB")
    m.add_argument("--offload-dir", help="per actor, offload to this local directory what fits nowhere else")
    f = p.add_argument_group("filters")
    f.add_argument("--relations", help="comma-separated relations to keep (default: all)")
    f.add_argument("--max-facts-per-relation", type=int)
    f.add_argument("--max-templates", type=int, help="templates per fact (the first usable ones)")
    a = p.add_argument_group("attribution")
    a.add_argument("--n-steps", type=_steps, help="integration steps (default: 20), or auto (adaptive, see --tolerance)")
    a.add_argument("--method", help="quadrature rule: left (default; the paper with 20 steps), right, midpoint, trapezoid, "
                                      "gausslegendre (kn_ray.engine.METHODS checks it)")
    a.add_argument("--tolerance", type=float,
                   help="--n-steps auto: completeness residual <= T x |P - P(layer at baseline)| (default: 0.01)")
    a.add_argument("--nt-samples", type=int, help="smooth: average over K copies with noisy input embeddings (default: 0, off)")
    a.add_argument("--stdevs", type=float, help="smoothing noise per token, x its embedding's RMS (default: 0.1)")
    a.add_argument("--nt-seed", type=int, help="seed of the smoothing noise (default: 0)")
    a.add_argument("--precision", choices=PRECISIONS, help="compute (autocast; default auto)")
    a.add_argument("--batch-prompts", type=int, help="prompts per engine batch (default: 32)")
    k = p.add_argument_group("kept rows")
    k.add_argument("--keep-ratio", type=float, help="keep neurons with score >= R x the prompt's max (default: 0.1)")
    k.add_argument("--dense", action="store_true", default=None,
                   help="keep every score: one row per (prompt, layer), the layer's scores as a list")
    k.add_argument("--dense-dtype", choices=("float32", "float16"), help="dense scores' type (default: float32)")
    k.add_argument("--activation-keep-ratio", type=float, help="keep activations >= R x the prompt's max (default: 0.5)")
    w = p.add_argument_group("workers")
    w.add_argument("--workers", type=int, help="actors (default: one per GPU, else one per CPU of the cluster)")
    w.add_argument("--cpus-per-worker", type=float, help="logical CPUs per actor (default: 1)")
    w.add_argument("--gpus-per-worker", type=float, help="GPUs per actor (default: 1 if the cluster has GPUs)")
    w.add_argument("--shard-size", type=int, help="prompts per shard (default: 64, fewer for small inputs)")
    w.add_argument("--max-attempts", type=int, help="attempts per shard before it is failed (default: 3)")
    p.add_argument("--report-facts", type=int, help="facts whose top neurons are printed at the end (default: 3)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _steps(text: str) -> int | str:
    if text == AUTO:
        return AUTO
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or {AUTO!r}, got {text!r}") from None


def spec_from_args(args) -> dict:
    """The job-spec mapping the flags describe (unset flags are left to the defaults)."""
    spec = dict(model=args.model, facts=args.facts, output=args.output, format=args.format, revision=args.revision,
                allow_pickle=args.allow_pickle, trust_remote_code=args.trust_remote_code, shard_size=args.shard_size,
                report_facts=args.report_facts, dtype=args.dtype, max_memory=args.max_memory,
                offload_dir=args.offload_dir)
    spec["filters"] = dict(relations=args.relations.split(",") if args.relations else None,
                           max_facts_per_relation=args.max_facts_per_relation, max_templates=args.max_templates)
    spec["attribution"] = dict(n_steps=args.n_steps, method=args.method, tolerance=args.tolerance, precision=args.precision,
                               nt_samples=args.nt_samples, stdevs=args.stdevs, nt_seed=args.nt_seed,
                               batch_prompts=args.batch_prompts)
    spec["keep"] = dict(ratio=args.keep_ratio, dense=args.dense, activation_ratio=args.activation_keep_ratio,
                        dense_dtype=args.dense_dtype)
    spec["workers"] = dict(count=args.workers, cpus=args.cpus_per_worker, gpus=args.gpus_per_worker,
                           max_attempts=args.max_attempts)
    return spec


def run(args) -> int:
    from kn_ray.interfaces.jobs import options_from_spec, run_and_report

    return run_and_report(options_from_spec(spec_from_args(args)), progress=not args.no_progress)
