"""The pipeline on a real (local, loopback) Ray: results against the engine, faults, resume, scale."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from kn_ray.engine import Attributor, load_model
from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.facts import read_facts
from kn_ray.pipeline.faults import ENV as FAULTS
from kn_ray.pipeline.options import KeepPolicy, Resources, RunOptions
from kn_ray.placement import Placement
from kn_ray.pipeline.prompts import build_prompts
from kn_ray.pipeline.record import RunConflict
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import kept
from tests.pipeline_fixtures import EVERY_PROMPT, EVERY_PROMPT_FLAGS, BAD_LINES, PARAREL, pararel_slice, save_tiny_model, texts_of_pararel
from tests.numerics import assert_same_frames, assert_same_numbers

N_STEPS = 4


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    data = pararel_slice(root / "pararel", relations=("P17", "P19", "P1412"), facts=4)
    texts = texts_of_pararel(data)
    return dict(root=root, data=data, bert=save_tiny_model("bert", texts, root / "bert"),
                llama=save_tiny_model("llama", texts, root / "llama"))


def options(world, out: Path, model="bert", workers=1, facts=None, **kw) -> RunOptions:
    kw = {"n_steps": N_STEPS, "shard_size": 10, **kw}
    # fp32 compute: `auto` is bf16 on CPUs with native bf16 (AVX512-BF16, AMX), whose rounding
    # depends on the batch composition, which differs between the pipeline and a direct call
    return RunOptions(Placement(str(world[model]), precision="fp32"), facts=str(facts or world["data"]), output=str(out),
                      resources=Resources(workers=workers, **kw.pop("res", {})), probe=kw.pop("probe", EVERY_PROMPT), **kw)


@pytest.fixture(scope="module")
def reference(world, ray_local):
    """An uninterrupted single-worker run, the baseline the fault tests compare to."""
    out = world["root"] / "reference"
    summary = run_pipeline(options(world, out), progress=False)
    assert summary.ok
    return out


def frames(out: Path) -> dict[str, pd.DataFrame]:
    store = RunDirectory(out)
    keys = {"prompts": ["prompt_id"], "neurons": ["prompt_id", "layer", "neuron"],
            "activations": ["prompt_id", "layer", "neuron"]}
    return {k: store.read(k).to_pandas().sort_values(v).reset_index(drop=True) for k, v in keys.items()}


def assert_same_results(a: Path, b: Path) -> None:
    fa, fb = frames(a), frames(b)
    for kind in fa:
        x, y = fa[kind].drop(columns=["seconds"], errors="ignore"), fb[kind].drop(columns=["seconds"], errors="ignore")
        assert_same_frames(x, y, what=f"{kind}.")


def assert_each_prompt_once(out: Path, expected_ids: set[str]) -> None:
    ids = RunDirectory(out).read("prompts", ["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) and set(ids) == expected_ids


def planned_ids(world, masked=True) -> set[str]:
    return {p.prompt_id for p in build_prompts(read_facts(world["data"]), masked=masked).prompts}


@pytest.mark.numerics
def test_results_equal_the_engine_run_directly(world, reference):
    """Every prompt once; status, probabilities and kept neurons as the engine computes them."""
    specs = build_prompts(read_facts(world["data"]), masked=True).prompts
    assert_each_prompt_once(reference, {s.prompt_id for s in specs})
    direct = Attributor(load_model(str(world["bert"]), device="cpu"), precision="fp32").attribute(
        [s.prompt for s in specs], [s.target for s in specs], n_steps=N_STEPS)
    got = frames(reference)
    prompts = got["prompts"].set_index("prompt_id")
    neurons = got["neurons"].groupby("prompt_id")
    assert (prompts["status"] == "ok").sum() > 10
    assert RunDirectory(reference).record().identity["model_info"]["dtype"] == "fp32"  # weights, as loaded
    keep = KeepPolicy()
    for spec, res in zip(specs, direct):
        row = prompts.loc[spec.prompt_id]
        assert row["status"] == res.status and (None if pd.isna(row["error"]) else row["error"]) == res.reason
        if not res.ok:
            assert spec.prompt_id not in neurons.groups
            continue
        assert_same_numbers(row["gold_prob"], res.gold_prob, what="gold_prob")
        mine = neurons.get_group(spec.prompt_id)
        want = {(int(res.layers[r]), int(c)) for r, c in zip(*kept(res.scores, keep.ratio, keep.dense))}
        have = set(zip(mine["layer"].astype(int), mine["neuron"].astype(int)))
        threshold = keep.ratio * res.scores.max()
        for layer, neuron in want ^ have:  # only borderline neurons may differ (batching rounding)
            assert abs(res.scores[layer, neuron] - threshold) < 1e-5 * res.scores.max()
        assert_same_numbers(mine["score"], res.scores[mine["layer"], mine["neuron"]], scale=np.abs(res.scores).max(),
                            what="kept scores")


def test_bad_input_rows_carry_reasons_and_good_facts_are_computed(world, ray_local, tmp_path):
    long_subject = " ".join(["Paris"] * 80)
    engine_skips = [
        (f'{{"id": "multi", "relation": "r", "subject": "France", "object": "Paris France", '
         f'"templates": ["[X] capital [Y] ."]}}', "it must be one"),
        (f'{{"id": "long", "relation": "r", "subject": "{long_subject}", "object": "Paris", '
         f'"templates": ["[X] capital [Y] ."]}}', "over the model's limit"),
        ('{"id": "nomask", "relation": "r", "subject": "a", "object": "Paris", "prompts": ["no mask here"]}',
         "exactly one mask token"),
    ]
    path = tmp_path / "facts.jsonl"
    path.write_bytes(b"\n".join([line for line, _ in BAD_LINES] + [line.encode() for line, _ in engine_skips]) + b"\n")
    world = dict(world, vocab=save_tiny_model("bert", [path.read_text(errors="ignore")], tmp_path / "model"))
    summary = run_pipeline(options(world, tmp_path / "out", model="vocab", facts=path, shard_size=3), progress=False)
    rows = RunDirectory(tmp_path / "out").read("prompts").to_pandas()
    assert summary.ok and len(rows) == summary.counts["ok"] + summary.counts["skipped"] + summary.counts["error"]
    assert sorted(rows.loc[rows["status"] == "ok", "fact_id"]) == ["ok1", "ok2"]
    for _, why in BAD_LINES:
        if why:
            assert (rows.loc[rows["status"] == "error", "error"].str.contains(why, regex=False)).sum() == 1, why
    for _, why in engine_skips:
        assert (rows.loc[rows["status"] == "skipped", "error"].str.contains(why, regex=False)).sum() == 1, why


@pytest.mark.numerics
def test_two_actors_give_the_results_of_one(world, ray_local, tmp_path):
    one = run_pipeline(options(world, tmp_path / "one", model="llama", workers=1), progress=False)
    two = run_pipeline(options(world, tmp_path / "two", model="llama", workers=2), progress=False)
    assert one.ok and two.ok and one.counts == two.counts and one.counts.get("ok", 0) > 10
    assert_each_prompt_once(tmp_path / "two", planned_ids(world, masked=False))
    assert_same_results(tmp_path / "one", tmp_path / "two")


def test_killed_actor_shards_rerun_elsewhere(world, reference, tmp_path, monkeypatch):
    monkeypatch.setenv(FAULTS, f"exit_once={tmp_path / 'killed'}")
    summary = run_pipeline(options(world, tmp_path / "out", workers=2), progress=False)
    assert (tmp_path / "killed").exists() and summary.actors_lost >= 1 and summary.retries >= 1
    assert summary.ok
    assert_each_prompt_once(tmp_path / "out", planned_ids(world))
    # the killed attempt (the first task: the probe shard) wrote its part before dying: never committed, removed
    parts = len(list((tmp_path / "out").rglob("part-*.parquet")))
    assert summary.stale_removed == 1 and parts == 3 * summary.shards + summary.probe["shards"]
    assert_same_results(reference, tmp_path / "out")


def test_failing_shard_is_reported_then_retried_by_a_rerun(world, reference, tmp_path, monkeypatch):
    from kn_ray.interfaces.jobs import run_and_summarise

    monkeypatch.setenv(FAULTS, "fail_shard=1")
    opts = options(world, tmp_path / "out", res=dict(max_attempts=2))
    assert run_and_summarise(opts, progress=False) == 1
    monkeypatch.delenv(FAULTS)
    summary = run_pipeline(opts, progress=False)
    assert summary.ok and summary.written == 1 and summary.resumed == summary.shards - 1
    assert_same_results(reference, tmp_path / "out")


def test_truncated_shard_is_recomputed_and_others_untouched(world, reference, tmp_path):
    out = tmp_path / "out"
    assert run_pipeline(options(world, out), progress=False).ok
    victim = out / RunDirectory(out).commits.marker("part-00001")["files"]["neurons"]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*") if "part-00001" not in p.name}
    summary = run_pipeline(options(world, out), progress=False)
    assert summary.written == 1 and summary.resumed == summary.shards - 1
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert not victim.exists() and len(list(out.rglob("part-00001-*.parquet"))) == 3  # the damaged attempt removed
    assert_same_results(reference, out)


def test_other_configuration_is_refused(world, reference):
    with pytest.raises(RunConflict, match="n_steps"):
        run_pipeline(options(world, reference, n_steps=N_STEPS + 1), progress=False)


@pytest.mark.slow
def test_killed_driver_resumes_without_touching_finished_shards(world, reference, ray_local, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kn_ray.interfaces.cli", "attribute", "--model", str(world["bert"]),
           "--facts", str(world["data"]), "--output", str(out), "--n-steps", str(N_STEPS), "--shard-size", "10",
           "--precision", "fp32", "--workers", "1", "--no-progress", *EVERY_PROMPT_FLAGS]
    env = dict(os.environ, RAY_ADDRESS=ray_local, **{FAULTS: "delay=1.5"})
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while len(list((out / "_shards").glob("part-0*.json"))) < 2 and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    done = sorted((out / "_shards").glob("part-0*.json"))
    assert 2 <= len(done) < RunDirectory(reference).summary("probe")["attribution_plan"]["shards"]
    names = [p.stem for p in done]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("part-*.parquet") if p.stem[:10] in names}
    assert len(before) >= 3 * len(names)
    summary = run_pipeline(options(world, out), progress=False)
    assert summary.ok and summary.resumed >= len(names)
    assert all(p.stat().st_mtime_ns == t for p, t in before.items())
    assert_same_results(reference, out)


def test_auto_steps_reach_the_engine_through_ray(world, ray_local, tmp_path):
    """n_steps=auto (with its tolerance) travels to the actors like every engine option
    (RunOptions.engine_extra; smoothing takes the same path, test_jobs); the prompts table
    records the evaluations each layer took, as the engine run directly does."""
    specs = [s for s in build_prompts(read_facts(world["data"]), masked=False).prompts if s.status is None]
    kw = dict(n_steps="auto", tolerance=0.005)
    out = tmp_path / "auto"
    assert run_pipeline(options(world, out, model="llama", **kw), progress=False).ok
    assert json.loads((out / "run.json").read_text())["identity"]["attribution"] == dict(kw, rule="left", precision="fp32")
    prompts = frames(out)["prompts"].set_index("prompt_id")
    direct = Attributor(load_model(str(world["llama"]), device="cpu"), precision="fp32").attribute(
        [s.prompt for s in specs], [s.target for s in specs], **kw)
    assert all(res.ok for res in direct)
    for spec, res in zip(specs, direct):
        assert list(prompts.loc[spec.prompt_id, "evaluations"]) == res.evaluations.tolist()
        assert_same_numbers(prompts.loc[spec.prompt_id, "max_score"], res.max_score, what="max_score")


# ---- --executor local: the same run without Ray ------------------------------------------------
def local(world, out: Path, **kw) -> RunOptions:
    return options(world, out, res=dict(executor="local", **kw.pop("res", {})), **kw)


@pytest.mark.numerics
def test_local_executor_gives_the_tables_of_a_ray_run(world, reference, tmp_path):
    summary = run_pipeline(local(world, tmp_path / "local"), progress=False)
    assert summary.ok and "local worker" in summary.workers
    ray_run = RunDirectory(reference)
    assert summary.shards == ray_run.summary("probe")["attribution_plan"]["shards"]
    assert RunDirectory(tmp_path / "local").summary("probe")["attribution_plan"]["fingerprint"] == \
        ray_run.summary("probe")["attribution_plan"]["fingerprint"]
    assert_each_prompt_once(tmp_path / "local", planned_ids(world))
    assert_same_results(reference, tmp_path / "local")


def test_local_executor_retries_then_resumes(world, reference, tmp_path, monkeypatch):
    """A shard failing every attempt fails the run (the others committed); a re-run computes
    only that one, like a Ray run's resume."""
    monkeypatch.setenv(FAULTS, "fail_shard=1")
    summary = run_pipeline(local(world, tmp_path / "out", res=dict(max_attempts=2)), progress=False)
    assert list(summary.failed) == ["part-00001"] and summary.retries == 1
    assert "failed 2 attempts; last: RuntimeError: injected failure of task 1" in summary.failed["part-00001"]
    monkeypatch.delenv(FAULTS)
    again = run_pipeline(local(world, tmp_path / "out", res=dict(max_attempts=2)), progress=False)
    assert again.ok and again.written == 1 and again.resumed == again.shards - 1
    assert_same_results(reference, tmp_path / "out")


def test_local_executor_never_imports_ray(world, tmp_path):
    """`kn-ray attribute --executor local` end to end in a fresh process: no Ray module loaded."""
    script = ("import sys; from kn_ray.interfaces.cli import main; "
              f"rc = main(['attribute', '--executor', 'local', '--model', {str(world['bert'])!r}, "
              f"'--facts', {str(world['data'])!r}, '--output', {str(tmp_path / 'out')!r}, '--n-steps', '2', "
              f"'--max-templates', '1', '--precision', 'fp32', '--no-progress', '--known', 'any']); "
              "assert rc == 0, rc; assert 'ray' not in sys.modules, 'ray imported'")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert RunDirectory(tmp_path / "out").read("prompts", ["status"]).num_rows == 12  # 3 relations x 4 facts x 1


# ---- shards sized to the pool -----------------------------------------------------------------
def test_shards_fill_the_actors_and_a_resume_elsewhere_plans_the_same(world, ray_local, tmp_path):
    """24 prompts on 2 actors: several shards (one engine batch, the size before the actor count
    counted, made one); the size is recorded, and a resume with another actor count (here: the
    local executor's one) plans the same shards and computes nothing."""
    from kn_ray.pipeline.facts import Filters
    from kn_ray.pipeline.plan import auto_shard_size

    out, few = tmp_path / "out", dict(shard_size=None, filters=Filters(max_templates=2))
    assert auto_shard_size(24) == 32  # one actor: a single shard
    first = run_pipeline(options(world, out, workers=2, **few), progress=False)
    plan = RunDirectory(out).summary("probe")["attribution_plan"]
    assert first.ok and first.shards >= 2 and plan["prompts"] == 24
    assert plan["shard_size"] == auto_shard_size(24, 2) and plan["chosen_by"] == "auto" and plan["actors"] == 2
    again = run_pipeline(local(world, out, **few), progress=False)
    assert again.ok and again.shards == first.shards and again.resumed == first.shards and again.written == 0
    replan = RunDirectory(out).summary("probe")["attribution_plan"]
    assert replan["fingerprint"] == plan["fingerprint"] and replan["chosen_by"] == "recorded"


def test_ray_start_window_is_configurable(monkeypatch):
    """$KN_RAY_START_TIMEOUT lengthens the wait for a local Ray's raylet (Ray's own is a fixed
    30 s, in `Node.__init__`, polling `services.get_node`); unset, nothing changes."""
    import inspect

    import ray._private.node
    from ray._private import services

    from kn_ray.pipeline import ray_cluster, ray_env

    source = inspect.getsource(ray._private.node.Node.__init__)
    assert "services.get_node(" in source and "raylet_start_wait_time_s = 30" in source  # the hook is still there
    polls = []

    def slow(gcs_address, node_id):  # the raylet registers on the third poll
        polls.append(node_id)
        if len(polls) < 3:
            raise RuntimeError("not registered yet")
        return {"node_id": node_id}

    monkeypatch.setattr(services, "get_node", slow)
    monkeypatch.setattr(ray_cluster, "START_POLL", 0.0)
    with ray_cluster.start_window(60.0):
        assert services.get_node("gcs", "n1") == {"node_id": "n1"} and len(polls) == 3
    assert services.get_node is slow
    polls.clear()
    with ray_cluster.start_window(1e-6), pytest.raises(RuntimeError, match="not registered"):
        services.get_node("gcs", "n1")  # past the window: Ray's own error path
    with ray_cluster.start_window(None):
        assert services.get_node is slow
    monkeypatch.delenv(ray_env.START_TIMEOUT, raising=False)
    assert ray_env.start_timeout() is None
    monkeypatch.setenv(ray_env.START_TIMEOUT, "120")
    assert ray_env.start_timeout() == 120.0
    for bad in ("soon", "0"):
        monkeypatch.setenv(ray_env.START_TIMEOUT, bad)
        with pytest.raises(ValueError, match=ray_env.START_TIMEOUT):
            ray_env.start_timeout()
