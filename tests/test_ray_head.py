"""kn-ray beside real `ray start --head` clusters, each private to its test (tests/ray_head.py):
a stale current-cluster file must not stop a local run."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kn_ray.pipeline.rundir import RunDirectory
from tests.pipeline_fixtures import EVERY_PROMPT_FLAGS, save_tiny_model
from tests.ray_head import start_head

FACTS = [("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]
TEMPLATES = ["[X] has its capital in [Y] .", "The capital of [X] is [Y] ."]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("heads")
    facts = root / "facts.jsonl"
    facts.write_text("".join(json.dumps(dict(id=s, relation="capital", subject=s, object=o, templates=TEMPLATES)) + "\n"
                             for s, o in FACTS))
    texts = [t.replace("[X]", s).replace("[Y]", o) for s, o in FACTS for t in TEMPLATES]
    return dict(root=root, facts=facts, model=save_tiny_model("bert", texts, root / "bert"))


def attribute(world, output: str, env: dict) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "kn_ray.interfaces.cli", "attribute", "--model", str(world["model"]),
           "--facts", str(world["facts"]), "--output", output, "--n-steps", "2", "--workers", "1", "--no-progress",
           *EVERY_PROMPT_FLAGS]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_a_stale_current_cluster_file_still_gives_a_fresh_local_ray(world, tmp_path):
    """`ray start` leaves Ray's current-cluster file behind when its cluster dies uncleanly;
    without RAY_ADDRESS, `kn-ray attribute` starts its own local Ray all the same."""
    head = start_head()
    try:
        stale = head.tmp / "ray" / "ray_current_cluster"
        assert stale.read_text().strip() == head.address
        head.kill()
        assert stale.exists() and not head.processes()
        done = attribute(world, str(tmp_path / "out"), head.env)  # no RAY_ADDRESS, the head's RAY_TMPDIR
        assert done.returncode == 0, done.stderr[-2000:]
    finally:
        head.stop()
    ids = RunDirectory(tmp_path / "out").read("prompts", ["prompt_id"]).column("prompt_id").to_pylist()
    assert len(ids) == len(set(ids)) == len(FACTS) * len(TEMPLATES)
