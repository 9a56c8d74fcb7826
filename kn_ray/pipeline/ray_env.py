"""The environment of the Ray processes kn-ray starts; imports no Ray.

Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` once, when it is imported, in this process and in
every process it starts. With clusters "disabled" a local Ray resolves its node address to
127.0.0.1 instead of the machine's public IP, so it binds to loopback only. `prepare()` sets it,
before the first `import ray` of a command (`driver.run_pipeline`, the edit stage), and only
when kn-ray starts the Ray itself (no $RAY_ADDRESS); nothing changes the environment on import.

It also sets `RAY_AUTH_MODE=token` (unless the user set it): the local Ray keeps Ray's token
authentication (its token in ~/.ray/auth_token, made on first use), which Ray would turn on by
default anyway but with a warning on every run. Loopback alone does not keep other users of a
shared machine out; the token does. Ray is quiet when the mode is set explicitly.

`KN_RAY_START_TIMEOUT` (seconds; `START_TIMEOUT`): how long a local Ray that kn-ray starts may
take to register its node. Ray waits a fixed 30 s for its raylet (not configurable in Ray 2.x),
too short on a machine loaded far beyond its cores; unset, Ray's 30 s stand
(`ray_cluster.start_window`). `--executor local` needs no Ray at all.
"""

from __future__ import annotations

import os

from . import faults

LOOPBACK_ONLY = ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
TOKEN_AUTH = ("RAY_AUTH_MODE", "token")
START_TIMEOUT = "KN_RAY_START_TIMEOUT"
NO_PROGRESS_BARS = "HF_HUB_DISABLE_PROGRESS_BARS"  # huggingface_hub's and transformers' bars ("Loading weights")

# Forwarded to the actors, so they reach the output filesystem as the driver does (Ray's
# runtime_env; never written to run.json or Parquet).
FORWARDED = (faults.ENV, NO_PROGRESS_BARS, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY",
             "AWS_SESSION_TOKEN", "AWS_DEFAULT_REGION", "AWS_REGION", "AWS_PROFILE", "AWS_CONFIG_FILE",
             "AWS_SHARED_CREDENTIALS_FILE", "GOOGLE_APPLICATION_CREDENTIALS")


def prepare() -> None:
    """Before Ray is imported: a local Ray to be started binds to loopback only, with token
    authentication chosen explicitly (so Ray does not warn about its default)."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(*LOOPBACK_ONLY)
        os.environ.setdefault(*TOKEN_AUTH)


def start_timeout() -> float | None:
    """$KN_RAY_START_TIMEOUT in seconds, or None (unset or empty: Ray's own 30 s)."""
    text = os.environ.get(START_TIMEOUT, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        raise ValueError(f"${START_TIMEOUT} must be a number of seconds, got {text!r}") from None
    if not seconds > 0:
        raise ValueError(f"${START_TIMEOUT} must be > 0, got {text!r}")
    return seconds


def no_progress_bars() -> None:
    """`--no-progress`: no library progress bars either (transformers' "Loading weights", the
    hub's downloads), here and in the actors (`FORWARDED`)."""
    os.environ[NO_PROGRESS_BARS] = "1"
    import sys

    if "transformers" in sys.modules:  # read on import; switch it off if already imported
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def forwarded() -> dict[str, str]:
    """The variables of `FORWARDED` set here, for the actors' runtime_env."""
    return {name: os.environ[name] for name in FORWARDED if os.environ.get(name)}
