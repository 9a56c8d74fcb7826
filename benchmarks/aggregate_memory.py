"""Time and peak memory of `kn-ray aggregate` on an output directory, measured in child processes.

    python benchmarks/aggregate_memory.py OUT [aggregate options...]

Prints JSON: wall seconds and peak RSS of the aggregate command, the peak RSS of a child that
only imports what the command imports (the floor no memory limit can lower), and the size of
the input rows on disk and as Arrow tables in memory.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

IMPORTS_ONLY = "import kn_ray.interfaces.cli, kn_ray.stages.aggregate, duckdb; duckdb.connect().execute('SELECT 1')"
ARROW_SIZE = ("import json, sys, pyarrow.dataset as ds; "
              "print(json.dumps({t: ds.dataset(f'{sys.argv[1]}/{t}').to_table().nbytes for t in sys.argv[2:]}))")
TABLES = ("neurons", "activations")


def _peak_rss_mb() -> float:
    """Largest RSS of any child waited for so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024


def measure(out: Path, options: list[str]) -> dict:
    subprocess.run([sys.executable, "-c", IMPORTS_ONLY], check=True)
    imports_mb = _peak_rss_mb()
    command = [sys.executable, "-m", "kn_ray.interfaces.cli", "aggregate", str(out), *options]
    started = time.perf_counter()
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    wall = time.perf_counter() - started
    peak_mb = _peak_rss_mb()  # children so far: the imports-only one (smaller) and this one
    arrow = json.loads(subprocess.run([sys.executable, "-c", ARROW_SIZE, str(out), *TABLES], check=True,
                                      capture_output=True, text=True).stdout)
    disk = {t: sum(f.stat().st_size for f in (out / t).glob("part-*.parquet")) for t in TABLES}
    return {"command": " ".join(["kn-ray", "aggregate", str(out), *options]), "wall_s": round(wall, 2),
            "peak_rss_mb": round(peak_mb), "imports_only_rss_mb": round(imports_mb),
            "input_parquet_mb": {t: round(v / 2**20) for t, v in disk.items()},
            "input_arrow_mb": {t: round(v / 2**20) for t, v in arrow.items()}}


if __name__ == "__main__":
    print(json.dumps(measure(Path(sys.argv[1]), sys.argv[2:]), indent=2))
