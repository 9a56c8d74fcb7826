"""`kn-ray aggregate OUT`: knowledge neurons per fact and relation from an attribute run."""

from __future__ import annotations

import json
import sys

from kn_ray.interfaces import declared
from kn_ray.stages.aggregate.params import AggregateParams


def register(sub) -> None:
    p = sub.add_parser("aggregate", help="knowledge neurons per fact and per relation (ig and activation baseline)",
                       description="Reads OUT/prompts, OUT/neurons and OUT/activations; writes "
                                   "OUT/knowledge_neurons, OUT/relation_neurons and their summary beside them. "
                                   "On a circuits run (--mode circuits) it writes OUT/relation_circuits instead.")
    p.add_argument("out", help="output directory of `kn-ray attribute`: a path or URI (s3://bucket/run)")
    declared.add_flags(p, AggregateParams)
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.stages.aggregate.stage import aggregate

    params = declared.from_args(AggregateParams, args)
    try:
        summary = aggregate(args.out, params)
    except MemoryError as error:
        print(f"kn-ray aggregate: error: {error}", file=sys.stderr)
        return 2
    chosen_p = {method: {relation: chosen["p"] for relation, chosen in per_relation.items()}
                for method, per_relation in summary.get("p_per_relation", {}).items()}  # none on a circuits run
    print(json.dumps({"counts": summary["counts"], "p_per_relation": chosen_p, "seconds": summary["seconds"]}, indent=2))
    return 0
