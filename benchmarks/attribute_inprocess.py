"""`kn-ray attribute` without Ray: the same run directory, computed shard by shard in this process.

For a machine so loaded that Ray's raylet misses its fixed 30 s start-up window (the PARAREL
corpus runs in RESULTS.md: load average ~30 on 2 cores). Takes `kn-ray attribute`'s flags; builds the same
prompts, plan, run.json (config hash) and Parquet parts as the Ray pipeline (kn_ray.pipeline
.driver), so `kn-ray aggregate / edit / report` read the result as any other run, and a re-run
resumes. One model, one torch thread (`--cpus-per-worker`), no retries: a failing shard stops it.
Shards run round-robin over relations (a run stopped early holds about as many facts of each);
`--part i/n` runs every n-th of them (slices of the whole plan, disjoint however far the run
got), so n processes can share one run; only part 0 removes stale files, so start it first.

    PYTHONPATH=. python benchmarks/attribute_inprocess.py --model smollm2 --facts DIR --output OUT ...
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kn_ray.interfaces import declared
from kn_ray.interfaces.commands.attribute import GROUPS
from kn_ray.interfaces.jobs import options_from_spec
from kn_ray.pipeline.driver import file_metadata, option_identity, run_record
from kn_ray.pipeline.facts import detect_format, read_facts
from kn_ray.pipeline.options import RunOptions
from kn_ray.pipeline.plan import auto_shard_size, plan_shards
from kn_ray.pipeline.prompts import build_prompts
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.worker import ShardComputer


def round_robin(shards: list) -> list:
    """The shards reordered: the first of each relation, then the second of each, ..."""
    by_relation: dict[str, list] = {}
    for shard in shards:
        by_relation.setdefault(shard.prompts[0].relation, []).append(shard)
    queues = list(by_relation.values())
    return [q[i] for i in range(max(map(len, queues), default=0)) for q in queues if i < len(q)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    declared.add_flags(parser, RunOptions, GROUPS)
    parser.add_argument("--part", default="0/1", help="i/n: run the i-th of n interleaved slices of the shards")
    parser.add_argument("--layers", default="", help="FIRST-LAST: attribute only these layers (default: all); "
                                                     "not in run.json: say so wherever the run is reported")
    args = parser.parse_args()
    part, parts = map(int, args.part.split("/"))
    first, _, last = args.layers.partition("-")
    layers = {"layers": list(range(int(first), int(last) + 1))} if args.layers else {}
    del args.part, args.layers
    options = options_from_spec(declared.spec_from_args(RunOptions, args))
    options.check()
    start = time.perf_counter()
    fmt = detect_format(Path(options.facts)) if options.facts_format == "auto" else options.facts_format
    facts = read_facts(options.facts, fmt, options.filters)
    run = RunDirectory(options.output)
    run.refuse_conflict(option_identity(options, fmt))
    computer = ShardComputer(options.placement, threads=max(1, int(options.resources.cpus_per_worker)))
    info = computer.info()
    prompts = build_prompts(facts, masked=info["masked"], max_templates=options.filters.max_templates)
    shards = plan_shards(prompts.prompts, options.shard_size or auto_shard_size(len(prompts.prompts)))
    record = run.open_run(run_record(options, fmt, info, shards, prompts.dropped_templates))
    done = run.commits.finished([s.name for s in shards], record.config_hash)
    if part == 0:
        run.commits.remove_stale(done)
    todo = [s for s in round_robin(shards)[part::parts] if s.name not in done]  # slices of the whole plan
    total = sum(map(len, todo))
    print(f"{len(shards)} shards, {len(todo)} to do ({total} prompts); model loaded in "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    computed = 0
    for shard in todo:
        o, shard_start = options, time.perf_counter()
        out = computer.compute(shard.shard_id, list(shard.prompts), o.n_steps, o.rule, o.keep, None, **o.engine_extra(), **layers)
        run.commits.write_shard(shard.name, out.tables, record.config_hash, dict(file_metadata(record), shard=shard.shard_id))
        computed += len(shard.prompts)
        seconds = time.perf_counter() - shard_start
        print(f"{shard.name}: {len(shard.prompts)} prompts in {seconds:.0f} s "
              f"({seconds / max(1, len(shard.prompts)):.1f} s/prompt); {computed}/{total} "
              f"at {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    print(run.uri)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
