"""The cluster recipes parse and name what they must: the job, GPU resources, one image."""

from __future__ import annotations

from pathlib import Path

import yaml

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
    assert spec["spec"]["entrypoint"].startswith("kn-ray run ") and spec["spec"]["entrypoint"].split()[2].endswith(JOB)
    cluster = spec["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"].startswith("2.")
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # actors never land on the driver's node
    [group] = cluster["workerGroupSpecs"]
    [worker] = group["template"]["spec"]["containers"]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == "1" and group["replicas"] >= 1
    images = {c["image"] for c in head["template"]["spec"]["containers"]} | {worker["image"]}
    assert len(images) == 1 and "kn-ray" in images.pop()
    words = spec["spec"]["entrypoint"].split()
    # facts and output on the object store, credentials from the pods' AWS environment
    assert words[words.index("--output") + 1].startswith("s3://") and words[words.index("--facts") + 1].startswith("s3://")
    for container in (head["template"]["spec"]["containers"][0], worker):
        assert any("secretRef" in source for source in container["envFrom"])
    options = load_job(ROOT / JOB, {"output": words[words.index("--output") + 1],
                                    "facts": words[words.index("--facts") + 1]})
    assert options.output.startswith("s3://") and options.facts.startswith("s3://")


def test_cluster_launcher_has_a_gpu_worker_type_and_the_image():
    spec = yaml.safe_load((ROOT / "cluster" / "ray-cluster-aws.yaml").read_text())
    types = spec["available_node_types"]
    assert spec["head_node_type"] in types and types[spec["head_node_type"]]["resources"]["CPU"] == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and gpu[0]["min_workers"] >= 1
    assert "kn-ray" in spec["docker"]["image"]
    head_start = " ".join(spec["head_start_ray_commands"])
    assert "--head" in head_start and "--dashboard-host=127.0.0.1" in head_start


def test_dockerfile_installs_the_package_on_a_ray_image():
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "FROM rayproject/ray:" in text and "pip install" in text and "/app" in text
