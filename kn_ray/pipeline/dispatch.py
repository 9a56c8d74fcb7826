"""Feeding tasks to an actor pool, with driver-side retries: Ray retries nothing
(`max_task_retries=0`); the driver resubmits a failed task itself, to any live actor, and counts
attempts: after `max_attempts` failures the task is marked failed. When no actor is left, the
driver waits `restart_wait` seconds for one to come back, then fails the remaining tasks: a
lost node never hangs a run.

The pool is either executor (`executor`: Ray actors, or one local worker); this module imports
no Ray.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from .executor import ActorSpec, open_executor
from .options import Resources


class TasksFailed(RuntimeError):
    """Some tasks failed `max_attempts` times (the message lists them)."""


@dataclass
class DispatchResult:
    written: list[str] = field(default_factory=list)  # keys of the tasks done
    failed: dict[str, str] = field(default_factory=dict)  # task key -> last error
    retries: int = 0
    actors_lost: int = 0  # calls that died with their actor (a crash, a lost node)
    actors_back: int = 0  # actors that answered again after such a loss (restarted, model reloaded)
    prompts: int = 0  # size of the tasks done (prompts, for shards)


class Dispatcher:
    """Feeds tasks to the pool and yields what comes back; resubmits what fails, to any live
    actor, up to `max_attempts` attempts per task.

    `call(actor, task) -> (handle, context)` submits one attempt (`pool.submit`); `results(tasks)` yields
    (task, value, context) per success. A consumer that rejects a value (a commit that fails)
    calls `retry(task, None, error)`; one attempt per task is ever in flight."""

    def __init__(self, pool, call, *, max_attempts: int, key=lambda task: task.name, size=len,
                 progress=None):
        self.pool, self.call, self.max_attempts, self.key, self.size = pool, call, max_attempts, key, size
        self.progress = progress
        self.result = DispatchResult()
        self.attempts: dict[str, int] = {}
        self.queue: deque = deque()

    def results(self, tasks):
        self.queue.extend(tasks)
        pending = {}
        while self.queue or pending:
            while self.queue and (lease := self.pool.reserve()) is not None:
                task = self.queue.popleft()
                ref, context = self.call(lease[0], task)
                pending[ref] = (task, lease, context)
            # nothing in flight: only lost actors coming back could take the queue; wait for them, bounded
            waiting = list(pending) + list(self.pool.pings)
            ready = self.pool.wait(waiting, timeout=None if pending else self.pool.restart_wait) if waiting else []
            if not ready:
                self.fail_queue(f"no worker came back within {self.pool.restart_wait:g} s" if waiting
                                else "no live workers left")
                break
            [ref] = ready
            if ref in self.pool.pings:
                self.pool.answer(ref)
                self.result.actors_back = self.pool.back
                continue
            task, lease, context = pending.pop(ref)
            try:
                value = self.pool.get(ref)
            except self.pool.task_errors as error:
                self.retry(task, lease, error)
                continue
            self.pool.release(lease)
            yield task, value, context

    def fail_queue(self, why: str) -> None:
        for task in self.queue:
            self.result.failed[self.key(task)] = why
            self._advance(task)
        self.queue.clear()

    def succeeded(self, task) -> None:
        self.result.written.append(self.key(task))
        self.result.prompts += self.size(task)
        self._advance(task)

    def retry(self, task, lease, error: Exception) -> None:
        """Count a failed attempt (the actor's call died or its result was rejected; `lease`: the
        pool's `(actor, generation)` of the call, None for a rejected result): requeue the task,
        or fail it after `max_attempts`."""
        if self.pool.died(error):
            self.result.actors_lost += self.pool.failed(lease)
        elif lease is not None:
            self.pool.release(lease)
        key = self.key(task)
        n = self.attempts[key] = self.attempts.get(key, 0) + 1
        if n >= self.max_attempts:
            self.result.failed[key] = f"failed {n} attempts; last: {self.pool.describe(error)}"
            self._advance(task)
        else:
            self.result.retries += 1
            self.queue.appendleft(task)

    def _advance(self, task) -> None:
        if self.progress is not None:
            self.progress.update(self.size(task))


def run_tasks(spec: ActorSpec, res: Resources, tasks, *, method: str = "run", key=lambda task: task.name,
              size=lambda task: 1):
    """Yield (task, result) of `<actor>.<method>(task)` over a pool of `spec`'s actors, as they
    finish; raises TasksFailed at the end if a task failed on every attempt. On Ray (a local one
    started, or $RAY_ADDRESS joined, if none is running), or `res.executor == "local"`: here."""
    with open_executor(spec, res) as pool:
        pool.model_info()
        dispatcher = Dispatcher(pool, lambda actor, task: (pool.submit(actor, method, task), None),
                                max_attempts=res.max_attempts, key=key, size=size)
        for task, value, _ in dispatcher.results(list(tasks)):
            dispatcher.succeeded(task)
            yield task, value
    if dispatcher.result.failed:
        raise TasksFailed("; ".join(f"{k}: {why}" for k, why in sorted(dispatcher.result.failed.items())))
