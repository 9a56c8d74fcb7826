"""Read every table of a run with Spark in local mode and check its row counts.

    python benchmarks/spark_read.py OUT [OUT ...]    # from the repository root; pyspark and a Java runtime

For each table of the run directory's catalogue (`kn_ray.pipeline.layout.TABLES`) that OUT
holds, `spark.read.parquet("OUT/<table>")` (the folder, as a data engineer would give it) must
count the rows kn-ray recorded: the shard markers' counts for the attribute tables, the
parts' footers for the others. A dense `neurons` table must also unnest (`posexplode`) to
rows x the FFN width. Prints one line per table, Spark's schema of it, and the versions;
exits 1 on a mismatch or a failed read.

Spark runs in this process's JVM, bound to the loopback address (SPARK_LOCAL_IP=127.0.0.1,
driver host and bind address 127.0.0.1, no UI). pyspark is not a kn-ray dependency:
`pip install pyspark` (tested with 4.3.0) and a Java 17 or 21 runtime (Debian:
`apt-get install default-jre-headless`).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kn_ray.pipeline.layout import TABLES  # noqa: E402
from kn_ray.pipeline.rundir import RunDirectory  # noqa: E402


def recorded_rows(run: RunDirectory, table: str) -> int:
    """kn-ray's count: the markers' rows (attribute tables), else the sum of the parts' footers."""
    if TABLES[table] == "attribute":
        return sum(marker["rows"][table] for marker in run.markers().values())
    return run.dataset(table).count_rows()


def spark_session():
    os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
    from pyspark.sql import SparkSession

    return (SparkSession.builder.master("local[2]").appName("kn-ray spark_read")
            .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.ui.enabled", "false").config("spark.ui.showConsoleProgress", "false")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate())


def check_run(spark, out: str) -> list[str]:
    """Print a line per table of OUT; returns the problems found."""
    from pyspark.sql import functions as F

    run = RunDirectory(out)
    record = run.config
    problems = []
    print(f"{out}: model {record.model_label}, neurons {'dense' if record.dense else 'sparse'}")
    for table in run.tables():
        expected = recorded_rows(run, table)
        try:
            frame = spark.read.parquet(run.path(table))
            got = frame.count()
        except Exception as error:  # a failed read is the finding, whatever Spark raised
            problems.append(f"{out}/{table}: {_first_line(error)}")
            print(f"  {table:18} FAILED {problems[-1]}")
            continue
        line = f"  {table:18} {got:>8} rows (kn-ray: {expected})"
        if got != expected:
            problems.append(f"{out}/{table}: Spark counts {got} rows, kn-ray {expected}")
        if table == "neurons" and "scores" in frame.columns:
            width = record.lookup("model_info", "num_neurons")
            cells = frame.select(F.posexplode("scores")).count()
            line += f"; posexplode(scores): {cells} = {got} x {cells // max(got, 1)}"
            if cells != got * width:
                problems.append(f"{out}/neurons: posexplode gives {cells} cells, not {got} x {width}")
        print(line)
        print("    " + ", ".join(f"{f.name} {f.dataType.simpleString()}" for f in frame.schema.fields))
    return problems


def _first_line(error: Exception) -> str:
    """Spark's own message (the JVM exception's, not py4j's wrapper), first line."""
    java = getattr(error, "java_exception", None)
    text = java.toString() if java is not None else f"{type(error).__name__}: {error}"
    return text.strip().splitlines()[0][:400]


def versions(spark) -> str:
    import pyspark

    java = spark.sparkContext._jvm.System.getProperty("java.version")
    return (f"Spark {spark.version} (pyspark {pyspark.__version__}), Java {java}, "
            f"Python {platform.python_version()}, local[2], loopback only")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="run directories (OUT of kn-ray attribute, aggregate, edit)")
    args = parser.parse_args(argv)
    spark = spark_session()
    spark.sparkContext.setLogLevel("ERROR")
    try:
        problems = [p for out in args.runs for p in check_run(spark, out)]
        print(versions(spark))
    finally:
        spark.stop()
    for problem in problems:
        print(f"problem: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
