"""benchmarks/gpu_check.py, the one-call GPU check, run in its smoke mode on the CPU so that it
cannot rot before a GPU runs it; and the checkpoint packing it needs to get SmolLM2 there."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.stats import spearmanr

from tiny_models import CONFIGS

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_check  # noqa: E402
import packed_checkpoint  # noqa: E402


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu-check")
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), str(out), "--smoke"],
                          capture_output=True, text=True, timeout=600)
    return proc, json.loads((out / "gpu_check.json").read_text()), (out / "gpu_check.md").read_text()


def test_smoke_run_passes_every_part(smoke):
    proc, report, _ = smoke
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    parts = report["parts"]
    assert report["smoke"] and report["finished"] and list(parts) == ["exact", "bf16", "oom", "bench"]
    assert parts["exact"]["status"] == "pass" and [r["family"] for r in parts["exact"]["rows"]] == sorted(CONFIGS)
    assert all(r["max_rel_err_scores"] <= 1e-4 and r["max_rel_err_probs"] <= 1e-4 for r in parts["exact"]["rows"])
    oom = parts["oom"]
    assert oom["status"] == "pass" and oom["back_offs"] >= 1 and oom["final_rows"] <= 2 < oom["first_rows"]
    for part in parts.values():
        assert part["seconds"] > 0 and set(part["peak_memory_mb_by_device"]) == {"cpu"}


def test_smoke_bf16_compares_the_same_prompts(smoke):
    """bf16 and fp32 of one tiny model rank neurons alike: compare() pairs the right results."""
    variants = smoke[1]["parts"]["bf16"]["variants"]
    assert [v["prompts"] for v in variants] == [2, 2]
    for v in variants:
        assert 0.9 < v["min_spearman"] <= 1 and 0 <= v["min_top10_shared"] <= 10 and v["max_rel_l2"] < 0.1


def test_smoke_bench_rows_and_markdown(smoke):
    _, report, markdown = smoke
    rows = report["parts"]["bench"]["rows"]
    want = [(c.model, c.precision) for c in gpu_check.SMOKE.bench]
    assert len(rows) == 2 * len(want)
    for row, (model, precision) in zip(rows[::2], want):
        assert row["precision"] == precision and (model in row["model"] or model == "smollm2")
    for row in rows:
        assert row["prompts_per_second"] > 0 and row["gflop_per_prompt"] > 0 and row["timer"] == "host clock"
        assert row["mfu"] is None  # no datasheet peak for a CPU
    assert "| exact | pass |" in markdown and "## Bench" in markdown and markdown.count("| engine |") == len(want)


def test_spearman_matches_scipy_with_ties():
    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 5, 200).astype(float), rng.normal(size=200)
    y[:50] = x[:50]
    assert gpu_check.spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)


def test_packed_checkpoint_is_within_half_a_step_and_keeps_vectors(tmp_path):
    from safetensors.numpy import load_file, save_file

    rng = np.random.default_rng(1)
    weights = {"w": rng.normal(size=(6, 40)).astype(np.float32) * np.arange(1, 7, dtype=np.float32)[:, None],
               "norm": rng.normal(size=40).astype(np.float32), "zero": np.zeros((2, 3), np.float32)}
    (tmp_path / "src").mkdir()
    save_file(weights, str(tmp_path / "src" / "model.safetensors"))
    (tmp_path / "src" / "config.json").write_text('{"model_type": "llama"}')
    packed_checkpoint.pack(tmp_path / "src", tmp_path / "packed", step=0.5)
    assert packed_checkpoint.is_packed(tmp_path / "packed")
    got = load_file(str(packed_checkpoint.unpack(tmp_path / "packed", tmp_path / "out") / "model.safetensors"))
    rms = np.sqrt((weights["w"] ** 2).mean(1, keepdims=True))
    assert np.all(np.abs(got["w"] - weights["w"]) <= 0.25 * rms * (1 + 1e-6))
    np.testing.assert_array_equal(got["norm"], weights["norm"])
    np.testing.assert_array_equal(got["zero"], weights["zero"])
    assert (tmp_path / "out" / "config.json").read_text() == '{"model_type": "llama"}'


@pytest.mark.parametrize("name, bf16, fp32", [
    ("NVIDIA H100 80GB HBM3", 989.0, 67.0), ("NVIDIA H100 PCIe", 756.0, 51.0), ("NVIDIA H100 NVL", 835.0, 60.0),
    ("NVIDIA H200", 989.0, 67.0), ("NVIDIA H200 NVL", 835.0, 60.0), ("NVIDIA A100-SXM4-80GB", 312.0, 19.5),
    ("NVIDIA GeForce RTX 4090", None, None),
])
def test_datasheet_peaks_by_device_name(monkeypatch, name, bf16, fp32):
    import torch

    from kn_ray.engine.bench import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    assert (peak_tflops(cuda, "bf16"), peak_tflops(cuda, "fp32")) == (bf16, fp32)
    assert peak_tflops(torch.device("cpu"), "bf16") is None
