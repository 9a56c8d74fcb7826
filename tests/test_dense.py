"""The dense layout end to end: one row per (prompt, layer), read by every downstream stage."""

from __future__ import annotations

import numpy as np
import pytest
import pandas as pd

from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import sparse_rows
from kn_ray.stages.aggregate import AggregateParams, aggregate
from tests.numerics import assert_same_frames, assert_same_numbers
from tests.test_s3 import local_run, options, world  # noqa: F401  (the tiny JSONL world, its model, a sparse run)

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them


def test_dense_run_holds_every_score_and_aggregates_as_a_sparse_run(world, local_run, tmp_path):  # noqa: F811
    """Dense rows are the whole [layers, neurons] arrays (the sparse run's rows among them);
    aggregation over them (unnested in DuckDB) finds the sparse run's knowledge neurons, since
    the coarse threshold t = 0.2 x max lies above the sparse run's keep ratio 0.1."""
    from dataclasses import replace

    out = tmp_path / "dense"
    assert run_pipeline(replace(options(world, str(out)), keep=KeepPolicy(dense=True)), progress=False).ok
    dense = RunDirectory(out)
    table = dense.read("neurons")
    info = dense.record().identity["model_info"]
    assert table.schema.field("scores").type.list_size == info["num_neurons"]
    ok = (dense.read("prompts").to_pandas().status == "ok").sum()
    assert table.num_rows == ok * info["num_layers"]
    rows = sparse_rows(table).to_pandas()
    sparse = RunDirectory(local_run).read("neurons").to_pandas()
    merged = sparse.merge(rows, on=["prompt_id", "layer", "neuron"], suffixes=("", "_dense"))
    assert len(merged) == len(sparse)
    assert_same_numbers(merged.score, merged.score_dense, what="dense vs sparse scores")
    top = rows.groupby("prompt_id").score.transform("max")
    assert ((rows.score >= 0.1 * top) & (rows.score > 0)).sum() == len(sparse)  # the sparse keep rule

    params = AggregateParams(p=0.3, min_prompts=1, methods=("ig",))
    kn = {}
    for name, path in (("dense", out), ("sparse", local_run)):
        aggregate(path, params)
        kn[name] = pd.read_parquet(path / "knowledge_neurons").sort_values(
            ["method", "fact_id", "layer", "neuron"]).reset_index(drop=True)
    assert len(kn["sparse"]) > 0
    assert_same_frames(kn["dense"], kn["sparse"], what="knowledge_neurons.")
