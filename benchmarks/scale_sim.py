"""Scale simulation: how many prompts/s can the driver commit? (no model; not a test)

Ray actors run a synthetic engine: each shard takes `len(shard) / per_actor_rate` seconds
(a GPU busy elsewhere), and the actor writes realistic Parquet parts (encoded once from the
real row builders) under the attempt's names, as the real worker does. The driver is the real
one: `execute.run_shards` (the pool, driver-side retries, health pings) checking every part and
committing every marker. Reported: the prompts/s the driver sustained, the driver's CPU time
per 1000 prompts (its ceiling is 1000 / that), its peak RSS, the bytes it sent to actors and
got back, and the bytes the workers wrote.

    python benchmarks/scale_sim.py --actors 1 8 64 --prompts 10000 100000 --rate 20000
    python benchmarks/scale_sim.py --layout dense --actors 8 --prompts 10000 --rate 2000
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import shutil
import tempfile
import time
from types import SimpleNamespace

import numpy as np
import psutil

SPARSE_NEURONS, SPARSE_ACTIVATIONS = 150, 60  # kept rows per prompt (BERT-base at the default keep ratios)


class SyntheticEngine:
    """An actor with the ShardComputer interface and no model. It encodes realistic shard
    tables once (the real row builders, `shard_tables`) and per shard writes those Parquet bytes
    under the attempt's names, so the files the driver checks are real and of real size while
    the actors' CPU (2 cores here for up to 64 actors) stays out of the measurement."""

    def __init__(self, per_actor_rate: float, layout: str, layers: int, neurons: int, shard_size: int, threads=None):
        import pyarrow as pa
        import pyarrow.parquet as pq

        from kn_ray.pipeline.options import KeepPolicy
        from kn_ray.pipeline.prompts import PromptSpec
        from kn_ray.pipeline.neuron_tables import shard_tables

        self.delay, self.layers, self.neurons = 1.0 / per_actor_rate, layers, neurons
        self.rng = np.random.default_rng(os.getpid())
        specs = [PromptSpec(f"{i:016x}", f"fact-{i // 8}", "P17", "Subject", "Object", "[X] is in [Y] .",
                            "Subject is in [MASK] .", "Object") for i in range(shard_size)]
        tables = shard_tables(specs, [self._result(layout) for _ in specs], KeepPolicy(dense=layout == "dense"), neurons)
        self.encoded = {}
        for kind, table in tables.items():
            sink = pa.BufferOutputStream()
            pq.write_table(table, sink)
            self.encoded[kind] = (sink.getvalue().to_pybytes(), table.num_rows)

    def info(self) -> dict:
        return dict(name="synthetic", source="synthetic", revision="synthetic", masked=True, num_layers=self.layers,
                    num_neurons=self.neurons, precision="fp32", device="cpu")

    def compute(self, shard_id, specs, n_steps, rule, keep, output):
        from kn_ray.pipeline.commit import Part
        from kn_ray.pipeline.layout import attempt_part
        from kn_ray.pipeline.storage import cached_storage
        from kn_ray.pipeline.worker import ShardResult

        start = time.perf_counter()
        run = cached_storage(output.uri)
        parts = {}
        for kind, (data, rows) in self.encoded.items():
            name = attempt_part(kind, output.shard, output.attempt)
            with run.fs.open_output_stream(run.path(name)) as stream:
                stream.write(data)
            parts[kind] = Part(name, rows, len(data))
        time.sleep(max(0.0, self.delay * len(specs) - (time.perf_counter() - start)))
        return ShardResult(parts=parts)

    def _result(self, layout: str):
        """What the engine's Attribution carries (without importing torch: 64 actors fit in memory)."""
        scores = np.zeros((self.layers, self.neurons), np.float32)
        acts = np.zeros((self.layers, self.neurons), np.float32)
        if layout == "dense":
            scores = self.rng.random((self.layers, self.neurons), dtype=np.float32)
        else:  # the kept share of a sparse run: scores above 0.1 x max on SPARSE_NEURONS neurons
            scores.flat[self.rng.choice(scores.size, SPARSE_NEURONS, replace=False)] = 1.0
        acts.flat[self.rng.choice(acts.size, SPARSE_ACTIVATIONS, replace=False)] = 1.0
        return SimpleNamespace(ok=True, status="ok", reason=None, gold_prob=0.5, top_token=" o", top_prob=0.5,
                               layers=tuple(range(self.layers)), scores=scores, activations=acts,
                               max_score=float(scores.max()), completeness=np.zeros(self.layers, np.float32),
                               seconds=0.01, evaluations=None)


def simulate(actors: int, prompts: int, rate: float, layout: str, shard_size: int, root: str) -> dict:
    import ray

    from kn_ray.pipeline import execute
    from kn_ray.pipeline.pool import ActorSpec, open_pool
    from kn_ray.pipeline.options import KeepPolicy, Resources, RunOptions
    from kn_ray.placement import Placement
    from kn_ray.pipeline.plan import plan_shards
    from kn_ray.pipeline.prompts import PromptSpec
    from kn_ray.pipeline.record import RunRecord
    from kn_ray.pipeline.rundir import RunDirectory

    out = os.path.join(root, f"{layout}-{actors}-{prompts}")
    shutil.rmtree(out, ignore_errors=True)
    specs = [PromptSpec(f"{i:016x}", f"fact-{i // 8}", f"P{i % 46}", "Subject", "Object", "[X] is in [Y] .",
                        "Subject is in [MASK] .", "Object") for i in range(prompts)]
    shards = plan_shards(specs, shard_size)
    options = RunOptions(Placement("synthetic"), facts="-", output=out, shard_size=shard_size,
                         keep=KeepPolicy(dense=layout == "dense"),
                         resources=Resources(workers=actors, cpus_per_worker=max(0.01, 1.0 / actors), in_flight=4))
    run = RunDirectory(out)
    identity = {"model": "synthetic", "plan": {"shards": len(shards)}}
    record = run.open_run(RunRecord.of(identity))
    for kind in ("prompts", "neurons", "activations"):
        os.makedirs(os.path.join(out, kind), exist_ok=True)
    with open_pool(ActorSpec(SyntheticEngine, (rate / actors, layout, 12, 3072, shard_size)), options.resources) as pool:
        pool.model_info()
        for actor in pool.actors:  # all actors up before the clock starts
            ray.get(actor.info.remote())
        process = psutil.Process()
        rss0, cpu0, t0 = process.memory_info().rss, process.cpu_times(), time.perf_counter()
        peak = [rss0]
        sent = sum(len(pickle.dumps(list(s.prompts))) for s in shards[:50]) / min(50, len(shards)) * len(shards)
        result = execute.run_shards(pool, shards, run, record.config_hash, options, {"config_hash": record.config_hash},
                                    progress=_Peak(process, peak))
        wall = time.perf_counter() - t0
        cpu1 = process.cpu_times()
    driver_cpu = (cpu1.user - cpu0.user) + (cpu1.system - cpu0.system)
    written = sum(e.stat().st_size for d in ("prompts", "neurons", "activations") for e in os.scandir(os.path.join(out, d)))
    marker = os.path.getsize(os.path.join(out, "_shards", "part-00000.json"))
    shutil.rmtree(out, ignore_errors=True)
    assert not result.failed and len(result.written) == len(shards)
    return dict(layout=layout, actors=actors, prompts=prompts, shards=len(shards), target_rate=rate,
                prompts_per_s=round(prompts / wall), wall_s=round(wall, 2),
                driver_cpu_s=round(driver_cpu, 2), driver_cpu_ms_per_1000_prompts=round(1000 * driver_cpu / prompts * 1000, 1),
                driver_ceiling_prompts_per_s=round(prompts / driver_cpu) if driver_cpu else None,
                driver_rss_mib_start=round(rss0 / 2**20), driver_rss_mib_peak=round(max(peak) / 2**20),
                driver_maxrss_mib=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
                bytes_to_actors=int(sent), bytes_from_actors_per_shard=len(pickle.dumps(_example_parts())),
                bytes_markers=marker * len(shards), bytes_written_by_workers=written)


def _example_parts():
    from kn_ray.pipeline.commit import Part
    from kn_ray.pipeline.worker import ShardResult

    return ShardResult(parts={k: Part(f"{k}/part-00000-0123456789.parquet", 1000, 100000)
                              for k in ("prompts", "neurons", "activations")})


class _Peak:
    """A progress sink that samples the driver's RSS every 200 updates."""

    def __init__(self, process, peak: list):
        self.process, self.peak, self.n = process, peak, 0

    def update(self, _n: int) -> None:
        self.n += 1
        if self.n % 200 == 0:
            self.peak.append(self.process.memory_info().rss)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--actors", type=int, nargs="+", default=[1, 8, 64])
    parser.add_argument("--prompts", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--rate", type=float, default=20_000, help="prompts/s of all actors together")
    parser.add_argument("--layout", choices=("sparse", "dense"), default="sparse")
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--dir", default=None, help="output root (default: a temporary directory)")
    args = parser.parse_args()
    import ray

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    root = args.dir or tempfile.mkdtemp(prefix="kn-scale-")
    try:
        for prompts in args.prompts:
            for actors in args.actors:
                print(json.dumps(simulate(actors, prompts, args.rate, args.layout, args.shard_size, root)), flush=True)
    finally:
        ray.shutdown()
        if args.dir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
