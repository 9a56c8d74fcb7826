"""The CPU default plan against the other arrangements of one machine's cores.

Runs `kn-ray attribute` (wall clock, one command at a time) with the default plan (one actor
per group of up to 8 CPUs, a torch thread per CPU), one single-threaded actor per CPU, and one
single-threaded actor, alternating for `--rounds` rounds, and prints the sharded work's time
(the summary's `N prompts in X s`: start-up and model loading left out) and the whole command's.
The machine's parallel speed-up is the best arrangement's against one single-threaded actor; the
default plan's share of it is the number the CPU default is chosen by. Give it at least two
shards per CPU of work (shards hold >= 32 prompts), or the actor-per-CPU plan idles.

    PYTHONPATH=. python benchmarks/cpu_plan.py --facts ../shared/data/pararel --relations P17,P19 \
        --max-facts-per-relation 8 --max-templates 4
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time


def arrangements(cpus: int) -> dict[str, list[str]]:
    return {"default": [], f"{cpus} actors x 1 thread": ["--workers", str(cpus), "--cpus-per-worker", "1"],
            "1 actor x 1 thread": ["--workers", "1", "--cpus-per-worker", "1"]}


def run_once(base: list[str], extra: list[str], out: str) -> tuple[float, float, str]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "kn_ray.interfaces.cli", "attribute", *base, "--output", out,
                           "--no-progress", *extra], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.exit(f"kn-ray attribute failed:\n{proc.stderr[-2000:]}")
    work = float(re.search(r"prompts in ([0-9.]+) s", proc.stdout).group(1))
    plan = re.search(r"^workers\s+(.*)$", proc.stdout, re.M).group(1)
    return work, wall, plan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--facts", required=True)
    parser.add_argument("--relations", default="P17,P19")
    parser.add_argument("--max-facts-per-relation", default="8")
    parser.add_argument("--max-templates", default="4")
    parser.add_argument("--n-steps", default="6")
    parser.add_argument("--method", default="gausslegendre")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    base = ["--model", args.model, "--facts", args.facts, "--relations", args.relations,
            "--max-facts-per-relation", args.max_facts_per_relation, "--max-templates", args.max_templates,
            "--n-steps", args.n_steps, "--method", args.method, "--precision", "fp32"]
    cpus = os.cpu_count() or 1
    times: dict[str, list[tuple[float, float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.rounds):
            for name, extra in arrangements(cpus).items():
                load = os.getloadavg()[0]
                work, wall, plan = run_once(base, extra, os.path.join(tmp, "out"))
                times.setdefault(name, []).append((work, wall))
                print(f"round {r + 1} {name:24s} ({plan}): work {work:.1f} s, command {wall:.1f} s, "
                      f"load before {load:.1f}", flush=True)
    mean = {name: sum(w for w, _ in t) / len(t) for name, t in times.items()}
    one = mean["1 actor x 1 thread"]
    best = max(one / m for m in mean.values())
    print("\n| arrangement | work (mean) | command (mean) | speed-up vs 1 x 1 | share of the best |\n|---|---|---|---|---|")
    for name, t in times.items():
        wall = sum(w for _, w in t) / len(t)
        print(f"| {name} | {mean[name]:.1f} s | {wall:.1f} s | {one / mean[name]:.2f}x | {one / mean[name] / best:.0%} |")


if __name__ == "__main__":
    main()
