"""Which PARAREL relations does a model know? A forward-only probe.

For every relation: the facts `kn-ray attribute --max-facts-per-relation N --max-templates K`
would take (the first N facts, their first K templates a causal LM can use), P(gold) and
whether the gold object's first token is the model's top-1 prediction. Prints one row per
relation (usable templates, facts, prompts, top-1 accuracy, mean P) and writes them as JSON.

    PYTHONPATH=. python experiments/probe_pararel.py --model gemma3-270m --facts /work/shared/data/pararel \
        --facts-per-relation 40 --templates 2 --json out/probe-gemma.json
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict

import numpy as np
import torch

from kn_ray.engine import Prober, load_model
from kn_ray.pipeline.facts import Filters, read_facts
from kn_ray.pipeline.prompts import build_prompts


def usable_templates(path: str) -> dict[str, int]:
    """Per relation, how many templates a causal LM can use (the object ends the sentence)."""
    specs = build_prompts(read_facts(path, "pararel", Filters(max_facts_per_relation=1)), masked=False).prompts
    counts: dict[str, int] = defaultdict(int)
    for spec in specs:
        counts[spec.relation] += spec.status is None
    return dict(counts)


def probe(model: str, path: str, facts: int, templates: int, precision: str, relations: tuple[str, ...] = ()) -> list[dict]:
    lm = load_model(model, device="cpu")
    prober = Prober(lm, precision=precision)
    specs = [s for s in build_prompts(read_facts(path, "pararel", Filters(relations=relations, max_facts_per_relation=facts)),
                                      masked=False, max_templates=templates).prompts if s.status is None]
    if not specs:
        raise SystemExit(f"no usable prompts under {path}")
    results = prober.probe([s.prompt for s in specs], [s.target for s in specs])
    rows: dict[str, dict] = defaultdict(lambda: dict(p=[], top1=[], facts=set()))
    for spec, res in zip(specs, results):
        if res.status != "ok":
            continue
        row = rows[spec.relation]
        row["p"].append(res.gold_prob)
        row["top1"].append(res.correct)
        row["facts"].add(spec.fact_id)
    usable = usable_templates(path)
    return sorted(
        (dict(relation=r, usable_templates=usable.get(r, 0), facts=len(v["facts"]), prompts=len(v["p"]),
              top1=float(np.mean(v["top1"])), mean_p=float(np.mean(v["p"])), median_p=float(np.median(v["p"])))
         for r, v in rows.items()),
        key=lambda row: -row["mean_p"],
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--facts", required=True, help="a PARAREL-layout directory")
    ap.add_argument("--facts-per-relation", type=int, default=40)
    ap.add_argument("--templates", type=int, default=2, help="first usable templates per fact")
    ap.add_argument("--precision", default="fp32")
    ap.add_argument("--relations", default="", help="comma-separated (default: all)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: no spinning on a shared machine)")
    ap.add_argument("--json", help="write the rows here")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    relations = tuple(r for r in args.relations.split(",") if r)
    rows = probe(args.model, args.facts, args.facts_per_relation, args.templates, args.precision, relations)
    print(f"| relation | usable templates | facts | prompts | top-1 | mean P | median P |  ({args.model}, "
          f"{time.perf_counter() - start:.0f} s)")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['relation']} | {r['usable_templates']} | {r['facts']} | {r['prompts']} | {r['top1']:.3f} | "
              f"{r['mean_p']:.3f} | {r['median_p']:.3f} |")
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(dict(model=args.model, facts_per_relation=args.facts_per_relation,
                           templates=args.templates, rows=rows), handle, indent=1)


if __name__ == "__main__":
    main()
