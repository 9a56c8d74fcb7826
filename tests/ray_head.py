"""A `ray start --head` of a test's own, isolated from every other Ray on the machine.

Its temp dir is private (`RAY_TMPDIR`, so even Ray's current-cluster file lands there), every
port is a free loopback port, and it is stopped by PID: the processes that name its temp dir
or its GCS address, and their children. Never `ray stop`, which stops every Ray of the machine.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import psutil

BIN = str(Path(sys.executable).parent)
RAY = os.path.join(BIN, "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def private_tmp() -> Path:
    """A short temp dir (Ray's socket paths must stay under 108 characters)."""
    return Path(tempfile.mkdtemp(prefix="knr-", dir="/tmp"))


@dataclass
class Head:
    tmp: Path  # RAY_TMPDIR of the head and of every command meant to see it
    address: str  # GCS address
    dashboard: str | None  # http://127.0.0.1:PORT when started with one
    started: list = field(default_factory=list)  # its processes right after the start

    @property
    def env(self) -> dict:
        """This process's environment with the head's RAY_TMPDIR, no RAY_ADDRESS, and this
        interpreter's bin first on PATH (a Ray Job's `python` is this one)."""
        env = dict(os.environ, RAY_TMPDIR=str(self.tmp), PATH=os.pathsep.join([BIN, os.environ.get("PATH", "")]))
        env.pop("RAY_ADDRESS", None)
        return env

    def processes(self) -> list[psutil.Process]:
        """The head's processes: those started with it (`started`), those naming its temp dir,
        and their children (psutil never signals a reused PID)."""
        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        roots = [*self.started, *naming(str(self.tmp))]
        found = {}
        for root in roots:
            try:
                for proc in [root, *root.children(recursive=True)]:
                    found[proc.pid] = proc
            except psutil.Error:
                pass
        return [p for pid, p in found.items() if pid not in me]

    def kill(self) -> None:
        """SIGKILL every process of the head (its current-cluster file stays behind)."""
        signal_all(self.processes(), psutil.Process.kill)

    def stop(self) -> None:
        """SIGTERM every process of the head, SIGKILL what is left after 10 s; remove its temp dir."""
        signal_all(self.processes(), psutil.Process.terminate)
        self.kill()
        shutil.rmtree(self.tmp, ignore_errors=True)


def naming(text: str) -> list[psutil.Process]:
    """The processes whose command line contains `text`."""
    procs = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(text in arg for arg in proc.info["cmdline"] or ()):
                procs.append(proc)
        except psutil.Error:
            pass
    return procs


def signal_all(procs: list[psutil.Process], send) -> None:
    """`send(proc)` to each (gone ones skipped), then wait up to 10 s for them to exit."""
    for proc in procs:
        try:
            send(proc)
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


@contextlib.contextmanager
def running_head(**kwargs):
    """A started head (`start_head`), stopped by PID at the end."""
    head = start_head(**kwargs)
    try:
        yield head
    finally:
        head.stop()


def start_head(*, dashboard: bool = False, num_cpus: int = 1) -> Head:
    tmp = private_tmp()
    gcs = free_port()
    ports = dict(port=gcs, node_manager_port=free_port(), object_manager_port=free_port(),
                 ray_client_server_port=free_port(), dashboard_port=free_port(),
                 dashboard_agent_listen_port=free_port(), dashboard_agent_grpc_port=free_port(),
                 metrics_export_port=free_port(), runtime_env_agent_port=free_port(),
                 min_worker_port=0, max_worker_port=0)
    cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--num-gpus=0",
           "--disable-usage-stats", f"--include-dashboard={str(dashboard).lower()}", "--dashboard-host=127.0.0.1",
           *(f"--{k.replace('_', '-')}={v}" for k, v in ports.items())]
    head = Head(tmp, f"127.0.0.1:{gcs}", f"http://127.0.0.1:{ports['dashboard_port']}" if dashboard else None)
    try:
        subprocess.run(cmd, env=head.env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, timeout=120)
    finally:  # the Ray client server names the GCS address only, not the temp dir
        head.started = naming(str(tmp)) + naming(f"--address={head.address}")
        if sys.exc_info()[0] is not None:  # a start that failed part-way leaves nothing behind
            head.stop()
    return head
