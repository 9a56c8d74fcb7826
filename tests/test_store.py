"""Parquet out: the vectorised neuron rows, atomic parts, done markers, readers, conflicts."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from kn_ray.engine import Attribution
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.prompts import PromptSpec
from kn_ray.pipeline.layout import attempt_part
from kn_ray.pipeline.commit import METADATA_KEY, CommitError, Part, new_attempt
from kn_ray.pipeline.record import RunConflict, RunRecord
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.uris import filesystem, public_uri
from kn_ray.pipeline.neuron_tables import KINDS, SCHEMAS, dense_schema, shard_tables, sparse_rows
from tests.numerics import assert_same_numbers


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
    neurons, acts = sparse_rows(tables["neurons"]).to_pylist(), tables["activations"].to_pylist()
    for spec, res in zip(specs, results):
        got = {(r["layer"], r["neuron"], r["score"]) for r in neurons if r["prompt_id"] == spec.prompt_id}
        got_act = {(r["layer"], r["neuron"], r["activation"]) for r in acts if r["prompt_id"] == spec.prompt_id}
        ok = res is not None and res.ok
        assert got == (_loop_keep(res.scores, res.layers, keep.ratio, keep.dense) if ok else set())
        assert got_act == (_loop_keep(res.activations, res.layers, keep.activation_ratio, False) if ok else set())
    assert all(r["fact_id"] == f"f{int(r['prompt_id'][1:]) // 2}" for r in neurons)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_dense_layout_is_the_score_array_one_row_per_layer(dtype):
    specs, results, tables = _shard(keep=KeepPolicy(dense=True, dense_dtype=dtype))
    dense = tables["neurons"]
    assert dense.schema.equals(dense_schema(40, dtype))
    ok = [(s, r) for s, r in zip(specs, results) if r is not None and r.ok]
    assert dense.num_rows == sum(len(r.layers) for _, r in ok)
    for (spec, res), start in zip(ok, range(0, dense.num_rows, 3)):
        rows = dense.slice(start, 3).to_pydict()
        assert rows["prompt_id"] == [spec.prompt_id] * 3 and rows["layer"] == list(res.layers)
        got = np.asarray(rows["scores"], dtype=np.float32)
        assert_same_numbers(got, res.scores, dtype=dtype, reduction=1, what="stored scores")  # rounded once to dtype
    empty = shard_tables(specs[2:3], [None], KeepPolicy(dense=True, dense_dtype=dtype), num_neurons=40)["neurons"]
    assert empty.num_rows == 0 and empty.schema.equals(dense_schema(40, dtype))


def test_prompt_rows_carry_status_and_engine_fields():
    specs, results, tables = _shard()
    rows = tables["prompts"].to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "skipped"]
    assert rows[3]["error"] == "too long" and rows[2]["error"] == "bad"
    assert rows[0]["max_score"] == float(results[0].scores.max())  # the same float32, widened
    assert rows[0]["completeness"] == [0.0, 0.0, 0.0] and rows[2]["completeness"] is None
    for kind, table in tables.items():
        assert table.schema.equals(SCHEMAS[kind])


def _record(n_steps=20) -> RunRecord:
    identity = dict(model="m", attribution=dict(n_steps=n_steps))
    return RunRecord.of(identity)


def _commit(run: RunDirectory, record: RunRecord, tables, shard="part-00000", attempt=None) -> dict:
    attempt = attempt or new_attempt()
    parts = run.commits.write_parts(shard, attempt, tables, dict(config_hash=record.config_hash, shard=0))
    return run.commits.commit(shard, attempt, parts, record.config_hash)


@pytest.fixture(params=["local", "memory"])
def out(request, tmp_path):
    """A run directory on the local disk, and one on an fsspec filesystem (no rename, like S3)."""
    return str(tmp_path / "out") if request.param == "local" else f"memory://kn-{tmp_path.name}/out"


def test_written_shard_is_whole_and_readable_everywhere(tmp_path):
    run = RunDirectory(tmp_path / "out")
    record = run.open_run(_record())
    _, _, tables = _shard()
    done = _commit(run, record, tables)
    assert run.commits.finished(["part-00000"], record.config_hash) == {"part-00000": done}
    assert not run.commits.finished(["part-00000"], "sha256:other")
    path = run.path(done["files"]["neurons"])
    meta = json.loads(pq.read_metadata(path).metadata[METADATA_KEY])
    assert meta["config_hash"] == record.config_hash
    assert not list((tmp_path / "out").rglob(".*tmp*"))  # no temporary files left

    import duckdb
    import pandas as pd

    n = tables["neurons"].num_rows
    assert len(pd.read_parquet(tmp_path / "out" / "neurons")) == n
    assert duckdb.sql(f"select count(*) from '{tmp_path}/out/neurons/*.parquet'").fetchall()[0][0] == n
    assert duckdb.sql(f"select max(len(completeness)) from '{tmp_path}/out/prompts/*.parquet'").fetchall()[0][0] == 3
    assert run.read("neurons").num_rows == n


@pytest.mark.parametrize("damage", ["truncate", "delete", "marker"])
def test_damaged_shard_is_not_finished(tmp_path, damage):
    run = RunDirectory(tmp_path)
    record = run.open_run(_record())
    done = _commit(run, record, _shard()[2])
    path = tmp_path / done["files"]["prompts"]
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:-20])
    elif damage == "delete":
        path.unlink()
    else:
        (tmp_path / "_shards" / "part-00000.json").write_text("{")
    assert run.commits.finished(["part-00000"], record.config_hash) == {}
    if damage == "marker":
        assert run.read("prompts").num_rows == 0


def test_only_the_marked_attempt_is_read_and_stale_attempts_are_removed(out):
    """Two attempts at one shard (a retry after a lost actor, a duplicate): the marker names one,
    readers see exactly its rows, resume trusts it, and cleanup deletes the other's parts."""
    run = RunDirectory(out)
    record = run.open_run(_record())
    first, second = _shard(seed=1)[2], _shard(seed=2)[2]
    lost = new_attempt()
    run.commits.write_parts("part-00000", lost, first, dict(config_hash=record.config_hash, shard=0))  # never committed
    done = _commit(run, record, second)
    assert run.read("neurons").equals(second["neurons"])
    assert run.commits.finished(["part-00000"], record.config_hash) == {"part-00000": done}
    assert run.commits.remove_stale(run.markers()) == 3
    left = sorted(i.path.rsplit("/", 2)[-2] + "/" + i.path.rsplit("/", 1)[-1] for k in KINDS for i in run.listing(k))
    assert left == sorted(done["files"].values())
    assert run.read("neurons").equals(second["neurons"])


def test_commit_refuses_parts_that_do_not_match(out):
    run = RunDirectory(out)
    record = run.open_run(_record())
    attempt = new_attempt()
    parts = run.commits.write_parts("part-00000", attempt, _shard()[2], dict(config_hash=record.config_hash, shard=0))
    wrong = dict(parts, neurons=Part(parts["neurons"].file, parts["neurons"].rows, parts["neurons"].bytes + 1))
    with pytest.raises(CommitError):
        run.commits.commit("part-00000", attempt, wrong, record.config_hash)
    other = dict(parts, prompts=Part(attempt_part("prompts", "part-00000", "x"), 1, parts["prompts"].bytes))
    with pytest.raises(CommitError):
        run.commits.commit("part-00000", attempt, other, record.config_hash)
    assert run.markers() == {} and run.read("prompts").num_rows == 0


def test_other_configuration_or_foreign_directory_is_refused(tmp_path):
    run = RunDirectory(tmp_path / "run")
    run.open_run(_record(20))
    assert run.open_run(_record(20)).config_hash == _record(20).config_hash
    with pytest.raises(RunConflict, match="n_steps: 20 -> 10"):
        run.open_run(_record(10))
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(RunConflict, match="not a kn-ray run"):
        RunDirectory(tmp_path / "foreign").open_run(_record())


@pytest.mark.parametrize("uri, want", [
    ("s3://KEY:SECRET@bucket/runs/a?endpoint_override=localhost:9000", "s3://bucket/runs/a"),
    ("gs://bucket/x", "gs://bucket/x"), ("file:///tmp/x", "file:///tmp/x")])
def test_recorded_uris_carry_no_secrets(uri, want):
    assert public_uri(uri) == want


def test_filesystems_resolve_from_uris(tmp_path):
    import pyarrow.fs as pafs

    assert filesystem(str(tmp_path)) == (pafs.LocalFileSystem(), str(tmp_path))
    fs, path = filesystem(f"file://{tmp_path}/run")
    assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/run"
    fs, path = filesystem("memory://bucket/run")  # no pyarrow filesystem: through fsspec
    assert isinstance(fs, pafs.PyFileSystem) and path.endswith("bucket/run")


def test_staged_tables_replace_what_they_select(out):
    """A later stage's table: staged locally, then published into OUT (renames locally, uploads
    elsewhere); a failed block publishes nothing."""
    import pyarrow as pa

    run = RunDirectory(out)
    for names in (["part-a-00000.parquet", "part-a-00001.parquet", "part-b-00000.parquet"], ["part-a-00000.parquet"]):
        with run.staged("edits", replace=lambda name: name.startswith("part-a-")) as tmp:
            for name in names:
                pq.write_table(pa.table({"x": [len(name)]}), tmp / name)
    left = [p.rsplit("/", 1)[-1] for p in run.parts("edits")]
    assert left == ["part-a-00000.parquet", "part-b-00000.parquet"]
    with pytest.raises(RuntimeError):
        with run.staged("edits") as tmp:
            pq.write_table(pa.table({"x": [1]}), tmp / "part-c-00000.parquet")
            raise RuntimeError("stage failed")
    assert [p.rsplit("/", 1)[-1] for p in run.parts("edits")] == left
    with run.staged("edits") as tmp:  # replace everything
        pq.write_table(pa.table({"x": [1]}), tmp / "part-00000.parquet")
    assert [p.rsplit("/", 1)[-1] for p in run.parts("edits")] == ["part-00000.parquet"]
