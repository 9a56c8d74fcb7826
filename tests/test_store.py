"""Parquet out: the vectorised neuron rows, atomic parts, done markers, readers, conflicts."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest

from kn_ray.engine import Attribution
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.prompts import PromptSpec
from kn_ray.pipeline.store import METADATA_KEY, RunConflict, Store, config_hash
from kn_ray.pipeline.tables import SCHEMAS, shard_tables


def _spec(i: int, status=None) -> PromptSpec:
    return PromptSpec(f"p{i}", f"f{i // 2}", "r", "s", "o", "[X] [Y]", f"prompt {i}", " o", status=status,
                      error="bad" if status else None)


def _result(rng, layers=(0, 2, 3), neurons=40) -> Attribution:
    scores = rng.normal(size=(len(layers), neurons)).astype(np.float32)
    acts = rng.normal(size=(len(layers), neurons)).astype(np.float32)
    return Attribution("prompt", " o", gold_prob=0.5, top_token=" o", top_prob=0.5, layers=layers, scores=scores,
                       activations=acts, completeness=np.zeros(len(layers), np.float32), seconds=0.1)


def _shard(seed=0, keep=KeepPolicy()):
    rng = np.random.default_rng(seed)
    specs = [_spec(0), _spec(1), _spec(2, status="error"), _spec(3)]
    results = [_result(rng), _result(rng), None, Attribution("prompt 3", " o", status="skipped", reason="too long")]
    return specs, results, shard_tables(specs, results, keep)


def _loop_keep(values, layers, ratio, dense):
    """Reference: an explicit loop over every neuron."""
    top = values.max()
    return {(layers[r], c, float(values[r, c])) for r in range(values.shape[0]) for c in range(values.shape[1])
            if dense or (values[r, c] >= ratio * top and values[r, c] > 0)}


@pytest.mark.parametrize("keep", [KeepPolicy(), KeepPolicy(ratio=0.5, activation_ratio=0.2), KeepPolicy(dense=True)])
def test_neuron_rows_match_a_loop_over_neurons(keep):
    specs, results, tables = _shard(keep=keep)
    neurons, acts = tables["neurons"].to_pylist(), tables["activations"].to_pylist()
    for spec, res in zip(specs, results):
        got = {(r["layer"], r["neuron"], r["score"]) for r in neurons if r["prompt_id"] == spec.prompt_id}
        got_act = {(r["layer"], r["neuron"], r["activation"]) for r in acts if r["prompt_id"] == spec.prompt_id}
        ok = res is not None and res.ok
        assert got == (_loop_keep(res.scores, res.layers, keep.ratio, keep.dense) if ok else set())
        assert got_act == (_loop_keep(res.activations, res.layers, keep.activation_ratio, False) if ok else set())
    assert all(r["fact_id"] == f"f{int(r['prompt_id'][1:]) // 2}" for r in neurons)


def test_prompt_rows_carry_status_and_engine_fields():
    specs, results, tables = _shard()
    rows = tables["prompts"].to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "skipped"]
    assert rows[3]["error"] == "too long" and rows[2]["error"] == "bad"
    assert math.isclose(rows[0]["max_score"], float(results[0].scores.max()), rel_tol=1e-6)
    assert rows[0]["completeness"] == [0.0, 0.0, 0.0] and rows[2]["completeness"] is None
    for kind, table in tables.items():
        assert table.schema.equals(SCHEMAS[kind])


def _record(n_steps=20):
    identity = dict(model="m", attribution=dict(n_steps=n_steps))
    return dict(identity=identity, config_hash=config_hash(identity))


def test_written_shard_is_whole_and_readable_everywhere(tmp_path):
    store = Store(tmp_path / "out")
    record = store.open_run(_record())
    _, _, tables = _shard()
    store.write_shard("part-00000", tables, dict(config_hash=record["config_hash"], shard=0))
    assert store.finished("part-00000", record["config_hash"])
    assert not store.finished("part-00000", "sha256:other")
    path = store.part("neurons", "part-00000")
    meta = json.loads(pq.read_metadata(path).metadata[METADATA_KEY])
    assert meta["config_hash"] == record["config_hash"]
    assert not list((tmp_path / "out").rglob(".*tmp*"))  # no temporary files left

    import duckdb
    import pandas as pd

    n = tables["neurons"].num_rows
    assert len(pd.read_parquet(tmp_path / "out" / "neurons")) == n
    assert duckdb.sql(f"select count(*) from '{tmp_path}/out/neurons/*.parquet'").fetchall()[0][0] == n
    assert duckdb.sql(f"select max(len(completeness)) from '{tmp_path}/out/prompts/*.parquet'").fetchall()[0][0] == 3
    assert store.read("neurons").num_rows == n


@pytest.mark.parametrize("damage", ["truncate", "delete", "marker"])
def test_damaged_shard_is_not_finished(tmp_path, damage):
    store = Store(tmp_path)
    record = store.open_run(_record())
    store.write_shard("part-00000", _shard()[2], dict(config_hash=record["config_hash"], shard=0))
    path = store.part("prompts", "part-00000")
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "delete":
        path.unlink()
    else:
        store.marker("part-00000").write_text("{")
    assert store.finished("part-00000", record["config_hash"]) is None
    assert store.read("prompts").num_rows == 0


def test_other_configuration_or_foreign_directory_is_refused(tmp_path):
    store = Store(tmp_path / "run")
    store.open_run(_record(20))
    assert store.open_run(_record(20))["config_hash"] == _record(20)["config_hash"]
    with pytest.raises(RunConflict, match="n_steps: 20 -> 10"):
        store.open_run(_record(10))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunConflict, match="not a kn-ray run"):
        Store(tmp_path / "foreign").open_run(_record())
