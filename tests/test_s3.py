"""Runs on an object store: a real S3 server (moto's standalone server) on 127.0.0.1.

The run directory has no rename there: these tests check the attempt-named parts and the
driver's marker commit end to end, against a run on the local disk.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.faults import ENV as FAULTS
from kn_ray.pipeline.options import Resources, RunOptions
from kn_ray.placement import Placement
from kn_ray.pipeline.layout import MARKERS, SHARD_KINDS
from kn_ray.pipeline.rundir import RunDirectory
from tests.numerics import assert_same_frames
from tests.pipeline_fixtures import EVERY_PROMPT, EVERY_PROMPT_FLAGS, save_tiny_model
from tests.s3_server import BUCKET, s3_server  # noqa: F401  (a fixture)

N_STEPS = 3
RELATIONS = {"capital": ("[X] has its capital in [Y] .", "The capital of [X] is [Y] .", "[X] is governed from [Y] ."),
             "language": ("People in [X] speak [Y] .", "The language of [X] is [Y] .", "[X] talks in [Y] .")}
FACTS = {"capital": [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Peru", "Lima")],
         "language": [("France", "French"), ("Japan", "Japanese"), ("Italy", "Italian"), ("Peru", "Spanish")]}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("s3world")
    lines = [json.dumps(dict(id=f"{rel}-{subj}", relation=rel, subject=subj, object=obj, templates=list(RELATIONS[rel])))
             for rel, pairs in FACTS.items() for subj, obj in pairs]
    facts = root / "facts.jsonl"
    facts.write_text("\n".join(lines) + "\n")
    texts = [t.replace("[X]", s).replace("[Y]", o) for rel, pairs in FACTS.items() for s, o in pairs
             for t in RELATIONS[rel]]
    return dict(root=root, facts=facts, model=save_tiny_model("bert", texts, root / "bert"))


def options(world, output: str, facts: str | None = None, workers: int = 1) -> RunOptions:
    return RunOptions(Placement(str(world["model"]), precision="fp32"), facts=facts or str(world["facts"]), output=output,
                      n_steps=N_STEPS, shard_size=3, resources=Resources(workers=workers), probe=EVERY_PROMPT)


@pytest.fixture(scope="module")
def local_run(world, ray_local):
    out = world["root"] / "local"
    assert run_pipeline(options(world, str(out)), progress=False).ok
    return out


def frames(out) -> dict[str, pd.DataFrame]:
    run = RunDirectory(out)
    keys = {"prompts": ["prompt_id"], "neurons": ["prompt_id", "layer", "neuron"],
            "activations": ["prompt_id", "layer", "neuron"]}
    return {k: run.read(k).to_pandas().drop(columns=["seconds"], errors="ignore").sort_values(v)
            .reset_index(drop=True) for k, v in keys.items()}


def assert_same(a, b) -> None:
    fa, fb = frames(a), frames(b)
    assert len(fa["prompts"]) == len(set(fa["prompts"].prompt_id)) == len(fb["prompts"]) > 0
    for kind in fa:
        assert_same_frames(fa[kind], fb[kind], what=f"{kind}.")


def objects(run: RunDirectory) -> dict[str, object]:
    """Every object under the run: relative name -> modification time."""
    return {i.path[len(run.root) + 1:]: i.mtime for i in run.listing(recursive=True)}


def assert_only_committed_parts(run: RunDirectory) -> None:
    markers = run.markers()
    named = sorted(f for m in markers.values() for f in m["files"].values())
    assert sorted(n for n in objects(run) if n.split("/")[0] in SHARD_KINDS) == named
    assert len(named) == 3 * run.summary("probe")["attribution_plan"]["shards"] + run.summary("probe")["shards"]


@pytest.fixture(scope="module")
def s3_run(world, s3_server, ray_local):
    """Facts read from S3, two actors writing parts to S3, the driver committing."""
    import boto3

    boto3.client("s3").upload_file(str(world["facts"]), BUCKET, "inputs/facts.jsonl")
    uri = f"s3://{BUCKET}/runs/equal"
    summary = run_pipeline(options(world, uri, facts=f"s3://{BUCKET}/inputs/facts.jsonl", workers=2), progress=False)
    assert summary.ok and summary.written == summary.shards > 2
    return uri


def test_s3_run_equals_a_local_run(s3_run, local_run, s3_server):
    """The rows of the local single-actor run; only committed parts left; nothing secret recorded."""
    uri = s3_run
    assert_same(local_run, uri)
    run = RunDirectory(uri)
    assert_only_committed_parts(run)
    record = json.dumps(run.record().as_dict())
    part = run.parts("prompts")[0]
    import pyarrow.parquet as pq

    metadata = pq.read_metadata(part, filesystem=run.fs).metadata[b"kn_ray"].decode()
    for secret in (s3_server["AWS_SECRET_ACCESS_KEY"], s3_server["AWS_ACCESS_KEY_ID"]):
        assert secret not in record and secret not in metadata
    assert run.record().input_path == f"s3://{BUCKET}/inputs/facts.jsonl"


def test_killed_driver_resumes_on_s3_without_rewriting_finished_parts(world, local_run, s3_server, ray_local):
    uri = f"s3://{BUCKET}/runs/killed"
    run = RunDirectory(uri)
    cmd = [sys.executable, "-m", "kn_ray.interfaces.cli", "attribute", "--model", str(world["model"]),
           "--facts", str(world["facts"]), "--output", uri, "--n-steps", str(N_STEPS), "--shard-size", "3",
           "--precision", "fp32", "--workers", "1", "--no-progress", *EVERY_PROMPT_FLAGS]
    env = dict(os.environ, RAY_ADDRESS=ray_local, **{FAULTS: "delay=1.0"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len([i for i in run.listing(MARKERS) if "part-0" in i.path]) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = run.markers()
    assert 2 <= len(done) < run.summary("probe")["attribution_plan"]["shards"]
    committed = {f for m in done.values() for f in m["files"].values()}
    before = {name: mtime for name, mtime in objects(run).items() if name in committed}
    markers_before = {name: json.dumps(m, sort_keys=True) for name, m in done.items()}

    summary = run_pipeline(options(world, uri), progress=False)
    attributed = [n for n in done if not n.startswith("part-probe-")]  # the probe shard finished before them
    assert summary.ok and summary.resumed >= len(attributed) and summary.written == summary.shards - summary.resumed
    assert summary.probe["written"] == 0
    after = objects(run)
    assert all(after.get(name) == mtime for name, mtime in before.items())  # finished parts not rewritten
    assert all(json.dumps(run.markers()[n], sort_keys=True) == m for n, m in markers_before.items())
    assert_only_committed_parts(run)  # stale attempts of the killed run removed
    assert_same(local_run, uri)  # no missing or duplicated prompt


def test_aggregate_edit_and_report_over_an_s3_run(s3_run, local_run, s3_server):
    """The downstream stages read the S3 run through its markers and write their tables back to
    the bucket: the same knowledge neurons and edit rows as over the local run, and a report."""
    from kn_ray.stages.aggregate import AggregateParams, aggregate
    from kn_ray.stages.edit.corpus import EditSettings, read_parts
    from kn_ray.stages.edit.stage import EditOptions, run_edits, save_edit
    from kn_ray.stages.report.html import write_report

    uri = s3_run
    params = AggregateParams(p=0.3, min_prompts=1)
    got = {out: aggregate(out, params) for out in (str(local_run), uri)}
    assert got[uri]["counts"] == got[str(local_run)]["counts"] and got[uri]["counts"]["ig"]["knowledge_neurons"] > 0
    kn = {out: RunDirectory(out).dataset("knowledge_neurons")
          .to_table().to_pandas().sort_values(["method", "fact_id", "layer", "neuron"]).reset_index(drop=True)
          for out in got}
    pd.testing.assert_frame_equal(kn[uri], kn[str(local_run)])

    edit = EditOptions(ops=("suppress", "amplify"), settings=EditSettings(control_prompts=2), local=True)
    rows = {}
    for out in got:
        run_edits(out, edit, progress=False)
        columns = ["op", "relation", "condition", "prompt_id", "prob_before", "prob_after", "rel_change"]
        rows[out] = read_parts(RunDirectory(out), "edits", columns).sort_values(
            ["op", "relation", "condition", "prompt_id", "prob_before"]).reset_index(drop=True)
    assert len(rows[uri]) > 0
    pd.testing.assert_frame_equal(rows[uri], rows[str(local_run)], check_exact=False, atol=1e-6)

    erase = EditOptions(ops=("erase",), relations=("capital",), local=True)
    saved = {uri: save_edit(uri, erase, f"s3://{BUCKET}/edited/capital"),
             str(local_run): save_edit(str(local_run), erase, local_run.parent / "edited")}
    assert saved[uri] == saved[str(local_run)] and saved[uri]["neurons"]
    bucket = {i.path.rsplit("/", 1)[-1]: i.size for i in RunDirectory(f"s3://{BUCKET}/edited/capital").listing()}
    assert bucket == {p.name: p.stat().st_size for p in (local_run.parent / "edited").iterdir()}
    assert {"config.json", "model.safetensors", "kn_ray_edit.json"} <= set(bucket)

    index = write_report(uri)
    assert index == f"{uri}/report/index.html"
    run = RunDirectory(uri)
    names = objects(run)
    assert "report/index.html" in names and any(n.startswith("report/") and n.endswith(".png") for n in names)
    assert "aggregate.json" in names and "edits.json" in names
    with run.fs.open_input_stream(run.path("report", "index.html")) as stream:
        assert b"Knowledge neurons of" in stream.read()
