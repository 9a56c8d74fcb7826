"""Seconds per prompt in steady state: the slope between two run sizes, so that start-up cancels.

Times `Attributor.attribute` in this process on the demo facts' prompts (18 of them; masked
models get their masked templates), for each rule, interleaved, on one torch thread:

* `--per-prompt`: one engine call per prompt, as the pipeline ran before shards held at least
  one engine batch (every shard was one prompt for runs under 64 prompts);
* otherwise: one call for all n prompts, as a shard of n prompts runs now.

Reports CPU seconds of this process (`time.process_time`; on a machine that other work shares,
the wall clock measures the others too) and wall seconds, the median, max and mean evaluations
per (prompt, layer), and the rows x blocks they run per prompt (a row scaled at layer l runs
blocks l..top: the arithmetic the evaluations cost).

    PYTHONPATH=. python benchmarks/steady_state.py --model smollm2 --sizes 2,8 [--per-prompt]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from kn_ray.engine import Attributor, load_model
from kn_ray.engine.random_models import PRESETS, random_model
from kn_ray.pipeline.facts import read_facts
from kn_ray.pipeline.prompts import build_prompts


def demo_prompts(masked: bool) -> tuple[list[str], list[str]]:
    from importlib.resources import files

    path = files("kn_ray") / "data" / "demo_facts.jsonl"
    specs = [s for s in build_prompts(read_facts(str(path), "jsonl"), masked=masked).prompts if s.status is None]
    return [s.prompt for s in specs], [s.target for s in specs]


def rule(text: str) -> dict:
    name, value = text.split(":")
    if name == "auto":
        return dict(n_steps="auto", tolerance=float(value))
    return dict(n_steps=int(value), rule=name)


def timed(attr, prompts, targets, kw, per_prompt: bool):
    cpu, wall = time.process_time(), time.perf_counter()
    if per_prompt:
        results = [r for p, t in zip(prompts, targets) for r in attr.attribute([p], [t], **kw)]
    else:
        results = attr.attribute(prompts, targets, **kw)
    return time.process_time() - cpu, time.perf_counter() - wall, results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--sizes", default="2,8", help="two run sizes (prompts)")
    ap.add_argument("--rules", default="left:20,gausslegendre:6,auto:0.01")
    ap.add_argument("--per-prompt", action="store_true", help="one engine call per prompt (the old 1-prompt shards)")
    ap.add_argument("--rounds", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(1)
    if args.model in PRESETS:  # real shapes, random weights; a tokenizer trained on the prompts' text
        lm = random_model(args.model, [" ".join(demo_prompts(m)[0] + demo_prompts(m)[1]) for m in (False, True)])
    else:
        lm = load_model(args.model, precision="fp32")
    attr = Attributor(lm, precision="fp32")
    prompts, targets = demo_prompts(lm.adapter.masked)
    small, large = (int(x) for x in args.sizes.split(","))
    rules = args.rules.split(",")
    attr.attribute(prompts[:1], targets[:1], n_steps=2)  # warm-up
    for rnd in range(args.rounds):
        for r in rules:
            got = {}
            for n in (small, large):
                got[n] = timed(attr, prompts[:n], targets[:n], rule(r), args.per_prompt)
            ev = np.concatenate([x.evaluations for x in got[large][2] if x.ok])
            # rows x blocks they run (a row scaled at layer l runs blocks l..top): the arithmetic
            row_blocks = np.mean([(x.evaluations * (lm.num_layers - np.array(x.layers))).sum()
                                  for x in got[large][2] if x.ok])
            slope = [(got[large][i] - got[small][i]) / (large - small) for i in (0, 1)]
            print(json.dumps(dict(model=args.model, rule=r, per_prompt=args.per_prompt, round=rnd,
                                  cpu_s_per_prompt=round(slope[0], 3), wall_s_per_prompt=round(slope[1], 3),
                                  cpu_s={n: round(v[0], 2) for n, v in got.items()},
                                  median_evaluations=float(np.median(ev)), max_evaluations=int(ev.max()),
                                  mean_evaluations=round(float(ev.mean()), 2),
                                  row_blocks_per_prompt=round(float(row_blocks)))),
                  flush=True)


if __name__ == "__main__":
    main()
