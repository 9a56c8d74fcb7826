"""Dense layout vs row-per-neuron: bytes per prompt, write time, read time (numpy, pandas, DuckDB).

Every neuron's score of BERT-base-shaped prompts (12 layers x 3072 neurons = 36,864 scores),
random, written the way the pipeline writes a shard (`shard_tables` + `Commits.write_parts`):

* rows:     one row per (prompt, neuron), every neuron kept (what `--dense` wrote before)
* dense32:  one row per (prompt, layer), `scores` fixed_size_list<float32>[3072]
* dense16:  the same with float16

    python benchmarks/dense_layout.py --prompts 256 --shard-size 64
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import duckdb
import numpy as np
import pyarrow.dataset as ds

from kn_ray.engine import Attribution
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.prompts import PromptSpec
from kn_ray.pipeline.commit import new_attempt
from kn_ray.pipeline.layout import shard_name
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import neuron_table, shard_tables

LAYOUTS = {"rows": None, "dense32": "float32", "dense16": "float16"}


def shard(rng, start: int, n: int, layers: int, neurons: int):
    specs = [PromptSpec(f"p{i:07d}", f"f{i // 4}", f"P{i % 40}", "s", "o", "[X] [Y]", f"prompt {i}", " o")
             for i in range(start, start + n)]
    results = [Attribution("prompt", " o", gold_prob=0.5, top_token=" o", top_prob=0.5, layers=tuple(range(layers)),
                           scores=rng.standard_normal((layers, neurons), dtype=np.float32),
                           activations=np.zeros((layers, neurons), np.float32),
                           completeness=np.zeros(layers, np.float32), seconds=0.1) for _ in specs]
    return specs, results


def tables_for(layout: str, specs, results, keep_activations: float = 1.0):
    if layout == "rows":  # every neuron a row: the row-per-neuron layout of a dense run
        tables = shard_tables(specs, results, KeepPolicy(activation_ratio=keep_activations))
        ok = list(zip(specs, results))
        tables["neurons"] = neuron_table(ok, "scores", "score", 0.0, True)
        return tables
    return shard_tables(specs, results, KeepPolicy(dense=True, dense_dtype=LAYOUTS[layout],
                                                   activation_ratio=keep_activations))


def measure(layout: str, args, root: Path) -> dict:
    rng = np.random.default_rng(0)
    run = RunDirectory(root / layout)
    write = 0.0
    for s in range(0, args.prompts, args.shard_size):
        specs, results = shard(rng, s, min(args.shard_size, args.prompts - s), args.layers, args.neurons)
        t0 = time.perf_counter()
        tables = tables_for(layout, specs, results)
        run.commits.write_parts(shard_name(s // args.shard_size), new_attempt(), tables, {"config_hash": ""})
        write += time.perf_counter() - t0
    files = sorted(str(p) for p in (root / layout / "neurons").glob("*.parquet"))
    size = sum(Path(f).stat().st_size for f in files)

    t0 = time.perf_counter()
    table = ds.dataset(files, format="parquet").to_table()
    if layout == "rows":
        array = table.column("score").to_numpy().reshape(-1, args.neurons)
    else:
        array = table.column("scores").combine_chunks().flatten().to_numpy().reshape(-1, args.neurons)
    numpy_s = time.perf_counter() - t0
    assert array.shape == (args.prompts * args.layers, args.neurons)

    t0 = time.perf_counter()
    frame = ds.dataset(files, format="parquet").to_table().to_pandas()
    pandas_s = time.perf_counter() - t0
    del frame

    listed = ", ".join(f"'{f}'" for f in files)
    con = duckdb.connect()
    per_layer = "SELECT layer, max(score) FROM read_parquet([{}]) GROUP BY layer" if layout == "rows" else \
        "SELECT layer, max(list_max(scores)) FROM read_parquet([{}]) GROUP BY layer"
    rows = "SELECT prompt_id, layer, neuron, score FROM read_parquet([{}]) WHERE score >= 3.5" if layout == "rows" else \
        ("SELECT prompt_id, layer, neuron, score FROM (SELECT prompt_id, layer, unnest(range(len(scores))) AS neuron, "
         "unnest(scores) AS score FROM read_parquet([{}])) WHERE score >= 3.5")
    t0 = time.perf_counter()
    con.sql(per_layer.format(listed)).fetchall()
    duck_layer_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    kept = len(con.sql(rows.format(listed)).fetchnumpy()["score"])
    duck_rows_s = time.perf_counter() - t0
    return dict(layout=layout, prompts=args.prompts, bytes_per_prompt=round(size / args.prompts),
                write_s=round(write, 3), write_ms_per_prompt=round(1000 * write / args.prompts, 3),
                numpy_s=round(numpy_s, 3), pandas_s=round(pandas_s, 3), duckdb_max_per_layer_s=round(duck_layer_s, 3),
                duckdb_top_rows_s=round(duck_rows_s, 3), top_rows=kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=256)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--neurons", type=int, default=3072)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="kn-dense-") as tmp:
        for layout in LAYOUTS:
            print(json.dumps(measure(layout, args, Path(tmp))), flush=True)


if __name__ == "__main__":
    main()
