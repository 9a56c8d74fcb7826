"""A pool of model-holding Ray actors of one class: started to the cluster's size, health-pinged,
dropped when dead for good, and the tasks in flight on each.

Ray restarts a crashed actor (`max_restarts`). After any failure the actor is pinged (`info()`,
the one call Ray retries through restarts): a restarted actor answers once its model is loaded
again, wherever Ray placed it (a node that replaced a lost one counts), and gets work again; a
permanently dead one is dropped. Work is fed to the pool by `dispatch.Dispatcher`.
"""

from __future__ import annotations

import contextlib
import ray
from ray.exceptions import RayActorError, RayError, RayTaskError

from .executor import ActorSpec, ModelLoadError  # noqa: F401 (ActorSpec: imported from here by callers)
from .options import Resources
from .ray_cluster import actor_resources, connected, describe_plan, single_node
from .uris import is_local

SAME_MODEL = ("revision", "precision", "dtype")  # what every actor's `info()` must agree on


class ActorPool:
    """The actors, their tasks in flight, and which are waiting on a health ping; the Ray
    executor of `executor` (its calls: submit, wait, get, lost, describe)."""

    task_errors = (RayError,)

    def __init__(self, spec: ActorSpec, res: Resources):
        count, opts = actor_resources(res, spec.gpus)
        self.plan = describe_plan(count, opts, bool(res.workers), spec.threads)
        threads = spec.threads or (None if opts["num_gpus"] else max(1, int(opts["num_cpus"])))
        remote = ray.remote(spec.actor_class).options(**opts)
        self.limit, self.restart_wait = res.in_flight, res.restart_wait
        self.actors = [remote.remote(*spec.args, threads=threads, **spec.kwargs) for _ in range(count)]
        # healthy actor -> tasks in flight. An actor gets work only once its ping has answered: a
        # call queued on an actor still loading waits for it as long as it takes, forever if its
        # node is lost and none has room for it again.
        self._load: dict = {}
        self.pings = {_ping(a): a for a in self.actors}  # ref -> actor not yet known healthy
        self.lost: set = set()  # actors whose call died with them, not yet back
        # how often each actor was found lost: a call submitted before a loss that reports after
        # the actor came back (its failure, or its release) belongs to the actor's past, not its present
        self._generation: dict = {}
        self.back = 0  # how often a lost actor came back
        self.info: dict | None = None

    def model_info(self) -> dict:
        """The model as the first healthy actor loaded it; raises if no actor can load it."""
        error = None
        while self.info is None:
            if not self.pings:
                raise ModelLoadError(f"no worker could load the model: {error}")
            [ref], _ = ray.wait(list(self.pings), num_returns=1)
            error = self.answer(ref) or error
        return self.info

    def answer(self, ref) -> str | None:
        """Handle a ping reply: the actor is healthy again, or dropped; returns an error text."""
        actor = self.pings.pop(ref)
        try:
            info = ray.get(ref)
        except RayError as error:
            self.drop(actor)
            return short_error(error)
        if self.info is None:
            self.info = info
        elif [info.get(k) for k in SAME_MODEL] != [self.info.get(k) for k in SAME_MODEL]:
            self.drop(actor)
            return f"worker loaded revision {info.get('revision')} at {info.get('precision')}, " \
                   f"not {self.info.get('revision')}"
        self._load[actor] = 0
        if actor in self.lost:
            self.lost.discard(actor)
            self.back += 1
        return None

    def reserve(self):
        """The least-busy healthy actor with room for another task, counted as busy with it, as a
        lease `(actor, generation)` to hand back to `release` or `failed`; or None."""
        ready = [a for a, n in self._load.items() if n < self.limit]
        if not ready:
            return None
        actor = min(ready, key=self._load.get)
        self._load[actor] += 1
        return actor, self._generation.get(actor, 0)

    def _current(self, lease) -> bool:
        actor, generation = lease
        return actor in self._load and generation == self._generation.get(actor, 0)

    def release(self, lease) -> None:
        """A task of the lease ended (its actor alive)."""
        if self._current(lease):
            self._load[lease[0]] -= 1

    def failed(self, lease) -> bool:
        """A call died with its actor: ping it before giving it more work (a dead actor fails the
        ping and is dropped). False if the actor was already being checked, or if the call was
        made before a loss already counted (the actor may be back since: the call's late failure
        is not a new loss)."""
        if not self._current(lease):
            return False
        actor = lease[0]
        del self._load[actor]
        self._generation[actor] = self._generation.get(actor, 0) + 1
        self.lost.add(actor)
        self.pings[_ping(actor)] = actor
        return True

    def drop(self, actor) -> None:
        self._load.pop(actor, None)
        ray.kill(actor, no_restart=True)

    @property
    def count(self) -> int:
        """The actors the pool started (the plan's size, lost ones included)."""
        return len(self.actors)

    def submit(self, actor, method: str, *args, **kwargs):
        return getattr(actor, method).remote(*args, **kwargs)

    def wait(self, refs, timeout=None) -> list:
        return ray.wait(list(refs), num_returns=1, timeout=timeout)[0]

    def get(self, ref):
        return ray.get(ref)

    def died(self, error: BaseException) -> bool:
        """The call died with its actor (a crash, a lost node)."""
        return isinstance(error, RayActorError)

    def describe(self, error: BaseException) -> str:
        return short_error(error)

    def shared_output(self, uri: str) -> bool:
        """Whether the actors can write to `uri` (else they return tables for the driver to
        write): a URI, or a local OUT with every actor on the driver's machine."""
        return not is_local(uri) or single_node()

    def shutdown(self) -> None:
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


@contextlib.contextmanager
def open_pool(spec: ActorSpec, res: Resources):
    """A pool for the block, on a Ray connected for it (`ray_cluster.connected`); its actors are
    killed after it, and a Ray this call started is shut down."""
    with connected(min_cpus=res.cpus_needed):
        pool = ActorPool(spec, res)
        try:
            yield pool
        finally:
            pool.shutdown()


def _ping(actor):
    """`actor.info()`, retried by Ray while the actor restarts (its node lost, its process
    crashed): it answers once the actor is back, or fails once it is gone for good."""
    return actor.info.options(max_task_retries=-1).remote()


def short_error(error: BaseException) -> str:
    """One line: the exception raised in a task or actor constructor (the traceback's last line),
    else what happened to the actor (the first line)."""
    text = str(error)
    lines = [line for line in text.strip().splitlines() if line.strip()] or [type(error).__name__]
    raised = isinstance(error, RayTaskError) or "creation task" in lines[0]
    return (lines[-1] if raised else lines[0]).strip()[:300]
