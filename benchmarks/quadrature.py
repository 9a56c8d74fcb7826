"""Score error against model evaluations for each quadrature rule.

For PARAREL prompts (causal templates), every rule's scores are compared with a 256-node
Gauss-Legendre reference integral over the same layers:

* relative L2: ||s - s_ref||_2 / ||s_ref||_2 over the prompt's [layers, neurons] scores;
* top-10 overlap: |top-10 neurons of s  ∩  top-10 of s_ref| / 10;
* evaluations: forward/backward rows per (prompt, layer), the baseline row included.

    PYTHONPATH=. python benchmarks/quadrature.py --prompts 16 --layers 20-29 > benchmarks/quadrature.md
"""

from __future__ import annotations

import argparse
import platform
import random
import time

import numpy as np
import torch

from kn_ray.engine import Attributor, load_model
from kn_ray.pipeline.facts import Filters, read_facts
from kn_ray.pipeline.prompts import build_prompts

RULES = [("left", 20), ("midpoint", 20), ("gausslegendre", 4), ("gausslegendre", 6), ("gausslegendre", 8),
         ("gausslegendre", 12), ("auto", 0.01), ("auto", 0.001)]


def pararel_prompts(path: str, n: int, seed: int) -> tuple[list[str], list[str]]:
    """n prompts of distinct facts, spread over the relations (causal templates only)."""
    specs = [s for s in build_prompts(read_facts(path, "pararel", Filters()), masked=False).prompts if s.status is None]
    by_fact: dict[str, list] = {}
    for spec in specs:
        by_fact.setdefault(spec.fact_id, []).append(spec)
    rng = random.Random(seed)
    facts = sorted(by_fact)
    rng.shuffle(facts)
    by_relation: dict[str, list] = {}
    for fact in facts:
        by_relation.setdefault(by_fact[fact][0].relation, []).append(rng.choice(by_fact[fact]))
    picked, relations = [], sorted(by_relation)
    while len(picked) < n and any(by_relation.values()):
        for r in relations:
            if by_relation[r] and len(picked) < n:
                picked.append(by_relation[r].pop())
    return [s.prompt for s in picked], [s.target for s in picked]


def metrics(got, ref) -> tuple[float, float]:
    l2 = float(np.linalg.norm(got - ref) / np.linalg.norm(ref))
    top = lambda s: set(np.argsort(s, axis=None)[-10:].tolist())  # noqa: E731
    return l2, len(top(got) & top(ref)) / 10


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pararel", default="/work/shared/data/pararel")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--layers", default="20-29", help="first-last layer (inclusive)")
    ap.add_argument("--reference-nodes", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    lo, hi = map(int, args.layers.split("-"))
    layers = list(range(lo, hi + 1))
    prompts, targets = pararel_prompts(args.pararel, args.prompts, args.seed)
    attr = Attributor(load_model("smollm2"), precision="fp32")

    def run(rule, steps):
        start = time.perf_counter()
        if rule == "auto":
            res = attr.attribute(prompts, targets, n_steps="auto", tolerance=steps, layers=layers)
        else:
            res = attr.attribute(prompts, targets, n_steps=steps, rule=rule, layers=layers)
        return res, time.perf_counter() - start

    ref, ref_s = run("gausslegendre", args.reference_nodes)
    ok = [i for i, r in enumerate(ref) if r.ok]
    print(f"SmolLM2-135M, fp32, {len(ok)} PARAREL prompts (causal templates, seed {args.seed}), layers {lo}-{hi}; "
          f"reference: Gauss-Legendre {args.reference_nodes} nodes ({ref_s:.0f} s). "
          f"torch {torch.__version__}, {platform.processor() or platform.machine()}.\n")
    mid, _ = run("midpoint", args.reference_nodes // 2)
    check = np.mean([metrics(mid[i].scores, ref[i].scores)[0] for i in ok])
    print(f"Reference check: midpoint-{args.reference_nodes // 2} vs the reference, mean relative L2 {check:.2e}.\n")
    print("| rule | evaluations / (prompt, layer) | mean rel. L2 | max rel. L2 | mean top-10 overlap | "
          "min top-10 overlap | median completeness / abs(P - P0) | seconds |")
    print("|---|---|---|---|---|---|---|---|")
    for rule, steps in RULES:
        res, secs = run(rule, steps)
        l2, top = zip(*(metrics(res[i].scores, ref[i].scores) for i in ok))
        evals = np.mean([res[i].evaluations.mean() for i in ok])
        rel_c = np.median([np.median(res[i].completeness / np.maximum(np.abs(res[i].gold_prob - res[i].baseline_prob), 1e-12))
                           for i in ok])
        name = f"auto, tolerance {steps}" if rule == "auto" else f"{rule}-{steps}"
        print(f"| {name} | {evals:.1f} | {np.mean(l2):.2e} | {np.max(l2):.2e} | {np.mean(top):.3f} | {np.min(top):.1f} | "
              f"{rel_c:.1e} | {secs:.1f} |", flush=True)


if __name__ == "__main__":
    main()
