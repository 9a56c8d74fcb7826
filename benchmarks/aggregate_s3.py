"""`kn-ray aggregate` over a run directory on S3 (a local moto server): wall time and peak memory.

    python -m tests.synthetic /tmp/syn10m --neuron-rows 10000000 --relations 20
    python benchmarks/aggregate_s3.py /tmp/syn10m

Uploads the run to a bucket on a moto server started on 127.0.0.1, then runs the aggregate
command on `s3://bench/run` in a child process (DuckDB scans the parts as pyarrow datasets;
the same command on the local copy uses DuckDB's own reader) and prints JSON: wall seconds
and peak RSS of each child.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import subprocess
import sys
import time
import urllib.request


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _aggregate(out: str, env: dict) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "kn_ray.interfaces.cli", "aggregate", out], check=True, env=env,
                   stdout=subprocess.DEVNULL)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return dict(out=out, wall_s=round(time.perf_counter() - started, 2),
                peak_rss_mib=round(peak / 1024) if peak > before else f"<= {round(before / 1024)}")


def main() -> None:
    local = os.path.abspath(sys.argv[1])
    port = _free_port()
    endpoint = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = dict(os.environ, AWS_ENDPOINT_URL=endpoint, AWS_ACCESS_KEY_ID="bench", AWS_SECRET_ACCESS_KEY="bench",
               AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(endpoint, timeout=1)
                break
            except OSError:
                time.sleep(0.2)
        os.environ.update(env)
        import boto3
        import pyarrow.fs as pafs

        boto3.client("s3").create_bucket(Bucket="bench")
        fs, _ = pafs.FileSystem.from_uri("s3://bench/run")
        started = time.perf_counter()
        pafs.copy_files(local, "bench/run", source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
        print(json.dumps(dict(upload_s=round(time.perf_counter() - started, 1))), flush=True)
        print(json.dumps(_aggregate("s3://bench/run", env)), flush=True)  # the larger child first: peaks are cumulative
        print(json.dumps(_aggregate(local, env)), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=10)


if __name__ == "__main__":
    main()
