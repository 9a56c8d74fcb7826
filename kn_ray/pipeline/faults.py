"""Fault injection for tests of the recovery paths, read from $KN_RAY_FAULTS in the worker.

Comma-separated settings (the driver forwards the variable to its actors); a task is an
attribution shard or an edit work unit, N its shard id or unit index:

* `exit_once=PATH`: the first task attempt that finds no file at PATH creates it and kills
  its worker process (`os._exit`) before returning: a crashed actor, exactly once per PATH.
* `fail_shard=N`: every attempt at task N raises: a task that can never succeed.
* `delay=SECONDS`: sleep before each task: time to interrupt a run midway.
* `hold=PATH`: each task waits while a file exists at PATH: a test holds a run at a point
  of its choosing (a node lost and replaced) and lets it go on by deleting PATH. A process
  waiting there says so by creating `PATH.held-by-PID` (a test knows then that the driver gave
  that actor work: a restarted actor's ping was answered).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "KN_RAY_FAULTS"


def settings() -> dict[str, str]:
    text = os.environ.get(ENV, "")
    return dict(item.split("=", 1) for item in text.split(",") if "=" in item)


def before_task(task_id: int | str) -> None:
    """`task_id`: a shard id or unit index; "probe-N" for the probe stage's shard N, which only
    `fail_shard=probe-N` reaches (delays and holds are for interrupting the attribution)."""
    faults = settings()
    numbered = isinstance(task_id, int)
    if "delay" in faults and numbered:
        time.sleep(float(faults["delay"]))
    if "hold" in faults and numbered and os.path.exists(faults["hold"]):
        Path(f"{faults['hold']}.held-by-{os.getpid()}").touch()
        while os.path.exists(faults["hold"]):
            time.sleep(0.05)
    if faults.get("fail_shard") == str(task_id):
        raise RuntimeError(f"injected failure of task {task_id} ({ENV})")


def after_task() -> None:
    marker = settings().get("exit_once")
    if marker:
        try:
            Path(marker).touch(exist_ok=False)
        except FileExistsError:
            return
        os._exit(17)
