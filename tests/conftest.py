"""Shared fixtures: one loopback-only local Ray for the whole session."""

from __future__ import annotations

import os

import pytest

# Set before ray is imported: no token auth for throwaway test clusters, loopback addresses only.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray with 4 logical CPUs; yields its GCS address (for subprocess drivers)."""
    import ray

    ray.init(address="local", num_cpus=4, include_dashboard=False, log_to_driver=False, logging_level="WARNING")
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()
