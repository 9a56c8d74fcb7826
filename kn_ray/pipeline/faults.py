"""Fault injection for tests of the recovery paths, read from $KN_RAY_FAULTS in the worker.

Comma-separated settings (the driver forwards the variable to its actors):

* `exit_once=PATH`: the first shard attempt that finds no file at PATH creates it and kills
  its worker process (`os._exit`) before returning: a crashed actor, exactly once per PATH.
* `fail_shard=N`: every attempt at shard N raises: a shard that can never succeed.
* `delay=SECONDS`: sleep before each shard: time to interrupt a run part-way.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "KN_RAY_FAULTS"


def settings() -> dict[str, str]:
    text = os.environ.get(ENV, "")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def before_shard(shard_id: int) -> None:
    faults = settings()
    if "delay" in faults:
        time.sleep(float(faults["delay"]))
    if faults.get("fail_shard") == str(shard_id):
        raise RuntimeError(f"injected failure of shard {shard_id} ({ENV})")


def after_shard() -> None:
    marker = settings().get("exit_once")
    if marker:
        try:
            Path(marker).touch(exist_ok=False)
        except FileExistsError:
            return
        os._exit(17)
