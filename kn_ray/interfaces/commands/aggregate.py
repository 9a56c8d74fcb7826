"""`kn-ray aggregate OUT`: knowledge neurons per fact and relation from an attribute run.

Reads OUT/prompts, OUT/neurons and OUT/activations; writes OUT/knowledge_neurons (fact-level
by default, --levels), OUT/relation_neurons, OUT/shared_neurons (relation and generic levels),
OUT/fact_consistency and their summary beside them. On a circuits run (--mode circuits) it
writes OUT/relation_circuits instead."""

from __future__ import annotations

import json
import sys

from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import RunDir, add_command
from kn_ray.stages.aggregate.params import AggregateParams


def register(sub) -> None:
    p = add_command(sub, "aggregate", run, description=__doc__,
                    help="knowledge neurons per fact and per relation (ig and activation baseline)")
    declared.add_flags(p, RunDir)
    declared.add_flags(p, AggregateParams)


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
