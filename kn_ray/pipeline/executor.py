"""Where tasks run: a pool of Ray actors (`pool.ActorPool`), or one worker in the driver's own
process (`LocalPool`, `--executor local`). Imports no Ray: the local executor never does.

Both pools give `dispatch.Dispatcher` the same calls, so the run's plan, probe stage, commits,
retries and resume are one code path whichever executes:

    reserve() -> lease | None      a worker with room for a task, counted busy with it
    release(lease) / failed(lease) a task ended; its worker died with it (Ray only)
    submit(worker, method, *args)  one call, as a handle for `wait` and `get`
    wait(handles, timeout)         the handles that finished (at most one)
    get(handle)                    its value, or raises one of `task_errors`
    died(error) / describe(error)  did the worker die with it; the error in one line
    pings, answer(ref)             workers being health-checked (Ray only; empty locally)

The local executor is for machines where Ray cannot start or should not (a load so high that
Ray's raylet misses its start window, `ray_env.START_TIMEOUT`; a debugger; a laptop run): the
same run directory, one worker, no Ray process at all. Its worker runs at the driver's
niceness, not Ray's 15 (docs/pipeline.md, "Execution").
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field

from .options import EXECUTORS, Resources  # noqa: F401 (EXECUTORS: the choices, declared with the option)

MAX_LOCAL_THREADS = 8  # torch threads of the local worker by default (as ray_cluster.MAX_CPU_GROUP)


class ModelLoadError(ValueError):
    """No worker could load the model (a wrong name or path, usually)."""


@dataclass(frozen=True)
class ActorSpec:
    """The workers of a pool: `actor_class(*args, threads=N, **kwargs)` with N torch threads
    (`threads`, else its logical CPUs on CPU actors, None on GPU actors), `gpus` each
    (`Placement.gpus_per_worker` and `.threads`)."""

    actor_class: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    gpus: float | None = None
    threads: int | None = None


class LocalCall:
    """A call on the local worker, run when the dispatcher waits for it (in submission order)."""

    def __init__(self, fn, args, kwargs):
        self.fn, self.args, self.kwargs = fn, args, kwargs
        self.done, self.value, self.error = False, None, None

    def run(self) -> None:
        try:
            self.value = self.fn(*self.args, **self.kwargs)
        except Exception as error:  # a failed attempt, retried like a failed Ray task
            self.error = error
        self.done = True
        self.fn = self.args = self.kwargs = None


class LocalPool:
    """One worker, in this process: `spec.actor_class` built here (its model loaded once), its
    calls run one at a time as the dispatcher waits for them. A failing call is a failed attempt
    (retried up to `max_attempts`, as on Ray); nothing is ever lost or restarted."""

    task_errors = (Exception,)
    restart_wait = 0.0
    count = 1
    back = 0

    def __init__(self, spec: ActorSpec, res: Resources):
        threads = spec.threads or (int(res.cpus_per_worker) if res.cpus_per_worker else None) or local_threads()
        self.plan = f"1 local worker in the driver's process ({threads} torch thread{'s' * (threads > 1)}); --executor local"
        self.limit = res.in_flight
        self.pings: dict = {}
        self._busy = 0
        import torch

        self._threads_before = torch.get_num_threads()  # the worker sets this process's; given back at the end
        try:
            self.worker = spec.actor_class(*spec.args, threads=threads, **spec.kwargs)
        except Exception as error:
            raise ModelLoadError(f"the worker could not load the model: {type(error).__name__}: {error}") from error
        self.info = None

    def model_info(self) -> dict:
        if self.info is None:
            self.info = self.worker.info()
        return self.info

    def reserve(self):
        if self._busy >= self.limit:
            return None
        self._busy += 1
        return self.worker, 0

    def release(self, lease) -> None:
        self._busy -= 1

    def failed(self, lease) -> bool:  # never called: `died` is always False
        self.release(lease)
        return False

    def answer(self, ref) -> str | None:
        raise KeyError(ref)  # no pings

    def submit(self, worker, method: str, *args, **kwargs) -> LocalCall:
        return LocalCall(getattr(worker, method), args, kwargs)

    def wait(self, handles, timeout=None) -> list:
        done = [h for h in handles if h.done]
        if not done and handles:
            handles[0].run()
            done = [handles[0]]
        return done[:1]

    def get(self, handle: LocalCall):
        if handle.error is not None:
            raise handle.error
        return handle.value

    def died(self, error: BaseException) -> bool:
        return False

    def describe(self, error: BaseException) -> str:
        text = str(error).strip().splitlines()
        return (f"{type(error).__name__}: {text[-1]}" if text else type(error).__name__)[:300]

    def shared_output(self, uri: str) -> bool:
        """The worker writes its parts (it is the driver's process)."""
        return True

    def shutdown(self) -> None:
        import torch

        self.worker = None
        torch.set_num_threads(self._threads_before)


def local_threads() -> int:
    """The local worker's torch threads by default: the CPUs this process may run on, at most
    MAX_LOCAL_THREADS (Ray's default CPU actor takes the same group of a node's CPUs)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(cpus, MAX_LOCAL_THREADS))


@contextlib.contextmanager
def open_executor(spec: ActorSpec, res: Resources):
    """The pool for the block: `--executor local`, one worker in this process (no Ray imported);
    else Ray actors (`pool.open_pool`: $RAY_ADDRESS joined, or a local Ray started and shut down)."""
    if res.executor == "local":
        pool = LocalPool(spec, res)
        try:
            yield pool
        finally:
            pool.shutdown()
        return
    from . import ray_env

    ray_env.prepare()  # before Ray is imported
    from .pool import open_pool

    with open_pool(spec, res) as pool:
        yield pool
