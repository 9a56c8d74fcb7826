"""Node loss on a simulated cluster (`ray.cluster_utils.Cluster`, loopback only, in a temp dir of
its own): a head of 0 CPUs (the driver's node) and two 1-CPU worker nodes, one actor on each. A
worker node is removed mid-run; (a) a new node joins a few seconds later, (b) none joins and the
run finishes on the survivor. Every run ends with every prompt (edit unit) exactly once and the
numbers of a local run, for `kn-ray attribute` and `kn-ray edit`."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time

import pandas as pd
import psutil
import pytest

from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.dispatch import TasksFailed, run_tasks
from kn_ray.pipeline.pool import ActorSpec
from kn_ray.pipeline.faults import ENV as FAULTS
from kn_ray.pipeline.options import Resources, RunOptions
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.placement import Placement
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.stages.edit.corpus import read_parts
from kn_ray.stages.edit.options import EditOptions, EditSettings
from kn_ray.stages.edit.stage import run_edits
from tests.pipeline_fixtures import EVERY_PROMPT, EVERY_PROMPT_FLAGS, save_tiny_model
from tests.ray_head import free_port, naming, private_tmp, signal_all
from tests.numerics import assert_same_edit_rows

N_STEPS, SHARD = 3, 2
DELAY = "0.3"  # seconds per task (KN_RAY_FAULTS)
REPLACE_AFTER = 3.0  # seconds from the loss to the new node
SUBJECTS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Peru": "Lima", "Spain": "Madrid",
            "Chile": "Santiago", "Egypt": "Cairo", "Kenya": "Nairobi", "Cuba": "Havana", "Iran": "Tehran"}
TEMPLATES = ["The capital of [X] is [Y] .", "[X] is governed from [Y] ."]
# Node death noticed in about 2 s (Ray's defaults, tens of seconds, would only make the tests slower).
HEALTH = dict(health_check_initial_delay_ms=0, health_check_period_ms=500, health_check_timeout_ms=1000,
              health_check_failure_threshold=4)


class SimulatedCluster:
    def __init__(self, tmp):
        from ray.cluster_utils import Cluster

        self.tmp = tmp
        saved = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(tmp)  # Cluster writes Ray's current-cluster file to the default temp dir
        try:
            self.cluster = Cluster(initialize_head=True, head_node_args=dict(
                num_cpus=0, node_ip_address="127.0.0.1", gcs_server_port=free_port(), include_dashboard=False,
                dashboard_agent_listen_port=free_port(), temp_dir=str(tmp / "ray"), _system_config=HEALTH))
        except BaseException:
            self.kill_leftovers()
            raise
        finally:
            os.environ.pop("RAY_TMPDIR") if saved is None else os.environ.update(RAY_TMPDIR=saved)

    def workers(self, n: int) -> None:
        """Exactly n live worker nodes (1 CPU each)."""
        while len(self.cluster.worker_nodes) < n:
            self.add()
        while len(self.cluster.worker_nodes) > n:
            self.remove()

    def add(self) -> None:
        self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1", temp_dir=str(self.tmp / "ray"))

    def remove(self) -> None:
        """Kill one worker node's processes (no graceful drain: a lost machine)."""
        self.cluster.remove_node(next(iter(self.cluster.worker_nodes)), allow_graceful=False)

    def restarted(self) -> int | None:
        """The process id of an actor that Ray restarted and that is alive again (its model
        loaded), or None."""
        alive = self.cluster.global_state.actor_table(None, actor_state_name="ALIVE").values()
        return next((actor["Pid"] for actor in alive if actor["NumRestarts"] >= 1), None)

    def env(self, hold) -> dict:
        return dict(os.environ, RAY_ADDRESS=self.cluster.address, RAY_TMPDIR=str(self.tmp),
                    **{FAULTS: f"delay={DELAY},hold={hold}"})

    def shutdown(self) -> None:
        try:
            for node in [*self.cluster.worker_nodes, self.cluster.head_node]:
                if node is not None:
                    self.cluster.remove_node(node, allow_graceful=False)
        finally:
            self.kill_leftovers()

    def kill_leftovers(self) -> None:
        signal_all(naming(str(self.tmp)), psutil.Process.kill)
        shutil.rmtree(self.tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def sim(ray_local):  # ray_local first, so the session's own Ray never starts in this module's temp dir
    cluster = SimulatedCluster(private_tmp())
    try:
        yield cluster
    finally:
        cluster.shutdown()


@pytest.fixture(scope="module")
def world(tmp_path_factory, ray_local):
    """A tiny BERT, its facts, a local single-actor run of them, aggregated."""
    root = tmp_path_factory.mktemp("nodeloss")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(dict(id=s, relation="capital", subject=s, object=o, templates=TEMPLATES)) + "\n"
                             for s, o in SUBJECTS.items()))
    texts = [t.replace("[X]", s).replace("[Y]", o) for s, o in SUBJECTS.items() for t in TEMPLATES]
    model = save_tiny_model("bert", texts, root / "bert")
    local = root / "local"
    opts = RunOptions(placement=Placement(model=str(model), precision="fp32"), facts=str(facts), output=str(local),
                      n_steps=N_STEPS, shard_size=SHARD, resources=Resources(workers=1, cpus_per_worker=1),
                      probe=EVERY_PROMPT)
    assert run_pipeline(opts, progress=False).ok
    aggregate(str(local), AggregateParams(p=0.3, min_prompts=1))
    return dict(root=root, facts=facts, model=model, local=local)


def held(hold, pid=None) -> set[int]:
    """Process ids of the actors waiting at the hold file with a task (`pid`: only that one)."""
    pids = {int(p.name.rsplit("-", 1)[1]) for p in hold.parent.glob(f"{hold.name}.held-by-*")}
    return pids if pid is None else pids & {pid}


def lose_a_node(sim: SimulatedCluster, proc: subprocess.Popen, replaced: bool, hold) -> bool:
    """The run starts held (`hold`: KN_RAY_FAULTS' hold file, touched before it starts); once
    both actors wait there with a task (each has work in flight, whatever the machine's load),
    a worker node is removed. Not replaced: the run goes on at once, on the survivor. Replaced: it
    stays held while a new node joins and Ray restarts the lost actor there, until the restarted
    actor waits at the hold with a task of its own: the driver's ping to it was answered (the
    actor counts as back) and it got work. Returns whether it did (False if not replaced).
    No fixed sleeps: under load the driver may take seconds to see an answer, and a run let go
    too early ends on the survivor alone ("0 back"); a node lost too late loses nothing."""
    deadline = time.time() + 120
    while len(held(hold)) < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    assert proc.poll() is None and len(held(hold)) == 2, "the actors never both held a task"
    sim.remove()
    if not replaced:
        hold.unlink()
        return False
    time.sleep(REPLACE_AFTER)
    sim.add()
    pid = None
    while proc.poll() is None and time.time() < deadline:
        pid = pid or sim.restarted()
        if pid is not None and held(hold, pid):
            break
        time.sleep(0.2)
    hold.unlink()
    return pid is not None and bool(held(hold, pid))


def finish(proc: subprocess.Popen) -> str:
    try:
        out, err = proc.communicate(timeout=150)  # a hang fails here instead of blocking the suite
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the run did not finish after a node loss:\n{out}\n{err[-3000:]}")
    assert proc.returncode == 0, out + err[-3000:]
    return out


def frames(out) -> dict[str, pd.DataFrame]:
    run = RunDirectory(out)
    keys = {"prompts": ["prompt_id"], "neurons": ["prompt_id", "layer", "neuron"],
            "activations": ["prompt_id", "layer", "neuron"]}
    return {k: run.read(k).to_pandas().drop(columns=["seconds"], errors="ignore").sort_values(v).reset_index(drop=True)
            for k, v in keys.items()}


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not-replaced"])
def test_attribute_survives_a_lost_node(sim, world, tmp_path, replaced):
    sim.workers(2)
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "kn_ray.interfaces.cli", "attribute", "--model", str(world["model"]),
           "--facts", str(world["facts"]), "--output", str(out), "--n-steps", str(N_STEPS),
           "--shard-size", str(SHARD), "--precision", "fp32", "--no-progress", *EVERY_PROMPT_FLAGS]
    hold = tmp_path / "hold"
    hold.touch()
    proc = subprocess.Popen(cmd, env=sim.env(hold), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    back = lose_a_node(sim, proc, replaced, hold)
    summary = finish(proc)
    assert back == replaced, f"the restarted actor never got a task:\n{summary}"
    assert "2 actors x 1 CPU" in summary and " 0 failed (" in summary and " 0 workers lost" not in summary
    assert re.search(rf"\b[1-9][0-9]* workers? lost, {int(replaced)} back\)", summary), summary  # replaced: the lost actor rejoined the pool
    got, want = frames(out), frames(world["local"])
    assert got["prompts"].prompt_id.is_unique and len(got["prompts"]) == len(SUBJECTS) * len(TEMPLATES)
    for kind in want:  # the same shards on 1-thread actors: the same numbers, bit for bit
        pd.testing.assert_frame_equal(got[kind], want[kind], check_exact=True)


def edit_rows(out) -> pd.DataFrame:
    rows = read_parts(RunDirectory(out), "edits", None)
    keys = ["op", "fact_id", "condition", "scope", "prompt_id", "metric"]
    return rows.sort_values(keys).reset_index(drop=True)


@pytest.fixture(scope="module")
def local_edits(world):
    run_edits(str(world["local"]), EditOptions(ops=("suppress",), settings=EditSettings(control_prompts=2),
                                               unit_facts=1, local=True), progress=False)
    return edit_rows(world["local"])


@pytest.mark.slow
@pytest.mark.parametrize("replaced", [True, False], ids=["replaced", "not-replaced"])
def test_edit_survives_a_lost_node(sim, world, local_edits, tmp_path, replaced):
    sim.workers(2)
    out = tmp_path / "run"
    shutil.copytree(world["local"], out)
    cmd = [sys.executable, "-m", "kn_ray.interfaces.cli", "edit", str(out), "--op", "suppress", "--control-prompts",
           "2", "--unit-facts", "1", "--workers", "2", "--no-progress"]
    hold = tmp_path / "hold"
    hold.touch()
    proc = subprocess.Popen(cmd, env=sim.env(hold), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lose_a_node(sim, proc, replaced, hold)
    finish(proc)
    got = edit_rows(out)
    assert len(got) == len(local_edits) > 0 and sorted(set(got.fact_id)) == sorted(set(local_edits.fact_id))
    assert_same_edit_rows(got, local_edits)


def test_with_no_actor_left_the_rest_fails_after_restart_wait(ray_local, tmp_path):
    """The actor's first task kills it; restarted, it never comes up (as on a lost node with none to
    replace it): the driver waits restart_wait seconds, then fails the remaining tasks."""

    class Vanishing:
        def __init__(self, marker: str, threads=None):
            while os.path.exists(marker):  # the restart: never ready
                time.sleep(1)
            self.marker = marker

        def info(self) -> dict:
            return {}

        def run(self, task):
            open(self.marker, "w").close()
            os._exit(1)

    res = Resources(workers=1, max_restarts=1, restart_wait=1.0)
    with pytest.raises(TasksFailed) as failed:
        list(run_tasks(ActorSpec(Vanishing, (str(tmp_path / "gone"),)), res, ["a", "b", "c"], key=str))
    assert str(failed.value) == "; ".join(f"{t}: no worker came back within 1 s" for t in "abc")


def test_a_call_from_before_a_loss_failing_late_is_not_a_new_loss(monkeypatch):
    """An actor with two calls in flight is lost: the first failure pings it; if its ping answers
    (the actor back) before the second call's failure is read, that failure belongs to the loss
    already counted: no second loss, no second ping, and its load stays the new actor's."""
    from types import SimpleNamespace

    from kn_ray.pipeline import pool as pool_module
    from kn_ray.pipeline.pool import ActorPool

    monkeypatch.setattr(pool_module, "_ping", lambda actor: f"ping-{actor}")
    monkeypatch.setattr(pool_module, "ray", SimpleNamespace(get=lambda ref: {"revision": "r"}))
    pool = ActorPool.__new__(ActorPool)
    pool.limit, pool._load, pool.pings, pool.lost, pool.back, pool.info, pool._generation = 2, {"a": 0}, {}, set(), 0, None, {}
    first, second = pool.reserve(), pool.reserve()
    assert pool.reserve() is None and pool.failed(first) and pool.pings == {"ping-a": "a"}
    pool.answer("ping-a")
    assert pool.back == 1 and pool._load == {"a": 0}
    assert not pool.failed(second) and not pool.pings and pool.back == 1 and pool._load == {"a": 0}
    pool.release(second)  # a late success of the old call: not the new actor's load
    third = pool.reserve()
    assert pool._load == {"a": 1} and third == ("a", 1)
    pool.release(third)
    assert pool._load == {"a": 0}


def test_summary_counts_read_in_the_singular_for_one():
    from types import SimpleNamespace

    from kn_ray.pipeline.summary import summary_text

    one = SimpleNamespace(output="out", counts={"ok": 1}, workers="1 actor x 1 CPU", shards=1, written=1, resumed=0,
                          failed={}, retries=1, actors_lost=1, actors_back=1, seconds=1.0, prompts_computed=1,
                          dispatch_seconds=1.0, throughput=1.0, probe={})
    text = summary_text(one)
    assert "(1 retry, 1 worker lost, 1 back)" in text and "; 1 prompt in" in text
    text = summary_text(SimpleNamespace(**{**vars(one), "retries": 2, "actors_lost": 0, "prompts_computed": 2}))
    assert "(2 retries, 0 workers lost, 1 back)" in text and "; 2 prompts in" in text
