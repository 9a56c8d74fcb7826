"""A `ray start --head` of a test's own, isolated from every other Ray on the machine.

Its temp dir is private (`RAY_TMPDIR`, so even Ray's current-cluster file lands there), every
port is a free loopback port, and it is stopped by PID: the processes that name its temp dir
or its GCS address, and their children. Never `ray stop`, which stops every Ray of the machine.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import psutil

RAY = str(Path(sys.executable).parent / "ray")


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

    @property
    def env(self) -> dict:
        return dict(os.environ, RAY_TMPDIR=str(self.tmp))

    def processes(self) -> list[psutil.Process]:
        me = {os.getpid(), *(p.pid for p in psutil.Process().parents())}
        roots = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.pid not in me and any(str(self.tmp) in a or self.address in a for a in proc.info["cmdline"] or ()):
                    roots.append(proc)
            except psutil.Error:
                pass
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
        procs = self.processes()
        for proc in procs:
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(procs, timeout=10)


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
    except BaseException:
        head.kill()
        raise
    return head
