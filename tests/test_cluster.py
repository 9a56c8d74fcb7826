"""The cluster recipes parse, and agree with kn-ray and the job they run: the entrypoint parses
with kn-ray's own CLI parser, resources match the job spec, one image built by the Dockerfile."""

from __future__ import annotations

import shlex
from pathlib import Path

import yaml

from kn_ray.interfaces.cli import build_parser
from kn_ray.interfaces.jobs import load_job

ROOT = Path(__file__).resolve().parents[1]
JOB = "jobs/pararel-bert-base.yaml"


def test_pararel_job_is_valid_and_wants_gpus():
    options = load_job(ROOT / JOB)
    assert options.placement.model == "bert-base-cased" and options.facts_format == "pararel"
    assert options.placement.gpus_per_worker == 1 and options.n_steps == 20 and options.keep.ratio == 0.1


def test_kuberay_rayjob_runs_the_job_on_gpu_workers():
    spec = yaml.safe_load((ROOT / "cluster" / "kuberay-rayjob.yaml").read_text())
    assert spec["apiVersion"] == "ray.io/v1" and spec["kind"] == "RayJob"
    command, *argv = shlex.split(spec["spec"]["entrypoint"])
    args = build_parser().parse_args(argv)  # kn-ray's own parser: a renamed flag fails here
    assert command == "kn-ray" and args.command == "run" and args.spec.endswith(JOB)
    # facts and output on the object store, credentials from the pods' AWS environment
    assert args.output.startswith("s3://") and args.facts.startswith("s3://")
    options = load_job(ROOT / JOB, {"output": args.output, "facts": args.facts})
    cluster = spec["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == _ray_image_version()
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # actors never land on the driver's node
    [group] = cluster["workerGroupSpecs"]
    [worker] = group["template"]["spec"]["containers"]
    assert float(worker["resources"]["limits"]["nvidia.com/gpu"]) >= options.placement.gpus_per_worker > 0
    assert group["replicas"] >= 1
    images = {c["image"] for c in head["template"]["spec"]["containers"]} | {worker["image"]}
    assert len(images) == 1
    for container in (head["template"]["spec"]["containers"][0], worker):
        assert any("secretRef" in source for source in container["envFrom"])


def test_cluster_launcher_has_a_gpu_worker_type_and_the_image():
    spec = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types and types[spec["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= load_job(ROOT / JOB).placement.gpus_per_worker]
    assert gpu and gpu[0]["min_workers"] >= 1
    head_start = [shlex.split(c) for c in spec["head_start_ray_commands"]]
    assert ["ray", "start", "--head"] == head_start[-1][:3] and "--dashboard-host=127.0.0.1" in head_start[-1]


def _dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of cluster/Dockerfile, comments and blank lines left out."""
    lines = (ROOT / "cluster" / "Dockerfile").read_text().splitlines()
    return [tuple(line.split(None, 1)) for line in lines if line.strip() and not line.lstrip().startswith("#")]


def _ray_image_version() -> str:
    [base] = [args for op, args in _dockerfile() if op == "FROM"]
    name, tag = base.split(":")
    assert name == "rayproject/ray"
    return tag.split("-")[0]


def test_dockerfile_installs_the_copied_package_on_a_ray_image():
    steps = _dockerfile()
    [copy] = [shlex.split(args) for op, args in steps if op == "COPY"]
    [install] = [shlex.split(args) for op, args in steps if op == "RUN"]
    assert copy[-2:] == [".", "/app"] and install[:2] == ["pip", "install"] and install[-1] == "/app"
    assert int(_ray_image_version().split(".")[0]) == 2  # pyproject: ray[default]>=2.40
