"""`kn-ray aggregate OUT`: knowledge neurons per fact and relation from an attribute run."""

from __future__ import annotations

import json
import sys


def register(sub) -> None:
    p = sub.add_parser("aggregate", help="knowledge neurons per fact and per relation (ig and activation baseline)",
                       description="Reads OUT/prompts, OUT/neurons and OUT/activations; writes "
                                   "OUT/knowledge_neurons, OUT/relation_neurons and OUT/aggregate.json.")
    p.add_argument("out", help="output directory of `kn-ray attribute`")
    p.add_argument("--t", type=float, default=0.2, help="coarse threshold: score >= t x the prompt's max (default 0.2)")
    p.add_argument("--activation-t", type=float, default=0.5, help="the same for the activation baseline (default 0.5)")
    p.add_argument("--p", type=float, default=0.7, help="share of a fact's usable prompts (default 0.7)")
    p.add_argument("--min-prompts", type=int, default=3, help="and at least this many prompts (default 3)")
    p.add_argument("--adaptive", action="store_true", help="tune p per relation to 2..5 knowledge neurons per fact")
    p.add_argument("--relation-share", type=float, default=0.1, help="share of a relation's facts (default 0.1)")
    p.add_argument("--no-activation", action="store_true", help="skip the activation baseline")
    p.add_argument("--memory-limit", default="256MB",
                   help="DuckDB memory limit; beyond it, work spills to disk (default 256MB)")
    p.add_argument("--threads", type=int, default=None, help="DuckDB threads (default: all cores)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.stages.aggregate import AggregateParams, aggregate

    params = AggregateParams(t=args.t, activation_t=args.activation_t, p=args.p, min_prompts=args.min_prompts,
                             adaptive=args.adaptive, relation_share=args.relation_share,
                             memory_limit=args.memory_limit, threads=args.threads,
                             methods=("ig",) if args.no_activation else ("ig", "activation"))
    try:
        summary = aggregate(args.out, params)
    except MemoryError as error:
        print(f"kn-ray aggregate: error: {error}", file=sys.stderr)
        return 2
    chosen_p = {method: {relation: chosen["p"] for relation, chosen in per_relation.items()}
                for method, per_relation in summary["p_per_relation"].items()}
    print(json.dumps({"counts": summary["counts"], "p_per_relation": chosen_p, "seconds": summary["seconds"]}, indent=2))
    return 0
