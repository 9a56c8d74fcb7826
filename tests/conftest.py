"""Shared fixtures: one loopback-only local Ray for the whole session."""

from __future__ import annotations

import os

import pytest

# Set before ray is imported: no token auth for throwaway test clusters, loopback addresses only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")

# The numerics matrix (`make test-numerics`, tests/numerics_matrix.py) runs the comparison-heavy
# tests (marker `numerics`) under other thread counts and batch splits; ATEN_CPU_CAPABILITY it sets
# in the environment, so Ray actors inherit it.
if os.environ.get("KN_TEST_THREADS"):
    import torch

    torch.set_num_threads(int(os.environ["KN_TEST_THREADS"]))


@pytest.fixture(autouse=True)
def _matrix_batch_tokens(monkeypatch):
    """KN_TEST_MAX_BATCH_TOKENS: the engine's default row-token budget in this process (small = many chunks)."""
    tokens = os.environ.get("KN_TEST_MAX_BATCH_TOKENS")
    if tokens:
        from kn_ray.engine.model_runner import ModelRunner

        monkeypatch.setattr(ModelRunner, "_default_batch_tokens", lambda self: int(tokens))


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs; yields its GCS address (for subprocess drivers)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
