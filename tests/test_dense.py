"""The dense layout end to end: one row per (prompt, layer), read by every downstream stage."""

from __future__ import annotations

import numpy as np
import pandas as pd

from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.tables import sparse_rows
from kn_ray.stages.aggregate import AggregateParams, aggregate
from tests.test_s3 import options, world  # noqa: F401  (the tiny JSONL world and its model)


def test_dense_run_holds_every_score_and_aggregates_as_the_sparse_run(world, ray_local, tmp_path):  # noqa: F811
    """Dense rows are the whole [layers, neurons] arrays; aggregation over them (unnested in
    DuckDB) finds the knowledge neurons of a sparse run that kept every positive score."""
    from dataclasses import replace

    runs = {"dense": KeepPolicy(dense=True), "sparse": KeepPolicy(ratio=0.0)}  # float16: tests/test_store.py
    for name, keep in runs.items():
        assert run_pipeline(replace(options(world, str(tmp_path / name)), keep=keep), progress=False).ok
    dense = RunDirectory(tmp_path / "dense")
    table = dense.read("neurons")
    info = dense.record().identity["model_info"]
    assert table.schema.field("scores").type.list_size == info["num_neurons"]
    ok = (dense.read("prompts").to_pandas().status == "ok").sum()
    assert table.num_rows == ok * info["num_layers"]
    rows = sparse_rows(table).to_pandas()
    sparse = RunDirectory(tmp_path / "sparse").read("neurons").to_pandas()
    merged = sparse.merge(rows, on=["prompt_id", "layer", "neuron"], suffixes=("", "_dense"))
    assert len(merged) == len(sparse) and np.allclose(merged.score, merged.score_dense, rtol=1e-5, atol=1e-7)
    assert (rows.score > 0).sum() == len(sparse)  # sparse at ratio 0 keeps exactly the positive scores

    params = AggregateParams(p=0.3, min_prompts=1)
    kn = {}
    for name in runs:
        summary = aggregate(tmp_path / name, params)
        assert summary["parameters"]["keep_ratio"]["ig"] == 0.0
        kn[name] = pd.read_parquet(tmp_path / name / "knowledge_neurons").sort_values(
            ["method", "fact_id", "layer", "neuron"]).reset_index(drop=True)
    assert len(kn["sparse"]) > 0
    pd.testing.assert_frame_equal(kn["dense"], kn["sparse"], check_exact=False, rtol=1e-5)
