"""DuckDB with bounded memory, the run directory's tables as DuckDB sources (any filesystem,
either neuron layout), and streaming query results into Parquet part files."""

from __future__ import annotations

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.pipeline.layout import part_file

ROWS_PER_PART = 1_000_000
BATCH_ROWS = 131_072


def connect(memory_limit: str = MEMORY_LIMIT, threads: int | None = None, temp_dir: Path | None = None):
    """An in-memory DuckDB whose joins and group-bys spill to `temp_dir` beyond `memory_limit`."""
    con = duckdb.connect(config={"memory_limit": memory_limit, "threads": threads or os.cpu_count() or 1,
                                 "preserve_insertion_order": False})
    if temp_dir is not None:
        con.execute("SET temp_directory = ?", [str(temp_dir)])
    return con


def read_parquet(files: list[str], union_by_name: bool = False) -> str:
    """SQL reading the given local Parquet files as one table."""
    listed = ", ".join("'" + f.replace("'", "''") + "'" for f in files)
    return f"read_parquet([{listed}]{', union_by_name = true' if union_by_name else ''})"


def source(con, run, table: str, union_by_name: bool = False, local_dir: Path | None = None,
           dense_rows: bool = True) -> str:
    """SQL for a table of the run (`kn_ray.pipeline.rundir.RunDirectory`): only the parts its
    markers name. Local parts are read by DuckDB's own reader. Parts elsewhere (S3, GCS, ...)
    are copied into `local_dir` when given (aggregation: DuckDB's reader then keeps its joins
    within the memory limit, spilling to disk), else reach DuckDB as a pyarrow dataset it scans
    batch by batch (no DuckDB extension needed). Dense `neurons` read as one row per neuron
    (`dense_rows=False`: as stored, one `scores` list per (prompt, layer))."""
    files = run.parts(table, required=True)
    if run.local:
        sql = read_parquet(files, union_by_name)
    elif local_dir is not None:
        sql = read_parquet(_download(run, files, Path(local_dir) / table), union_by_name)
    else:
        schema = pa.unify_schemas([pq.read_schema(f, filesystem=run.fs) for f in files]) if union_by_name else None
        name = f"t_{table}_{uuid.uuid4().hex[:8]}"
        con.register(name, ds.dataset(files, schema=schema, format="parquet", filesystem=run.fs))
        sql = name
    if table == "neurons" and dense_rows and run.config.dense:
        sql = (f"(SELECT prompt_id, fact_id, relation, layer, CAST(unnest(range(len(scores))) AS INTEGER) AS neuron, "
               f"CAST(unnest(scores) AS FLOAT) AS score FROM {sql})")
    return sql


def _download(run, files: list[str], directory: Path) -> list[str]:
    """Copy parts to `directory` (16 at a time); returns the local paths."""
    directory.mkdir(parents=True, exist_ok=True)
    local = [str(directory / f"{i:06d}-{f.rsplit('/', 1)[-1]}") for i, f in enumerate(files)]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda pair: pafs.copy_files(pair[0], pair[1], source_filesystem=run.fs,
                                                    destination_filesystem=pafs.LocalFileSystem()), zip(files, local)))
    return local


def write_query(con, query: str, schema: pa.Schema, directory: Path, rows_per_part: int = ROWS_PER_PART) -> int:
    """Stream a query's rows into `directory`'s part files (`layout.part_file`) cast to `schema`; returns rows."""
    relation = con.sql(query)
    # duckdb >= 1.4 names it to_arrow_reader; earlier releases fetch_arrow_reader
    reader = (getattr(relation, "to_arrow_reader", None) or relation.fetch_arrow_reader)(BATCH_ROWS)
    written, part, writer = 0, 0, None
    for batch in reader:
        if writer is None or writer.rows >= rows_per_part:
            if writer is not None:
                writer.close()
            writer = _PartWriter(directory / part_file(part), schema)
            part += 1
        writer.write(pa.Table.from_batches([batch]).select(schema.names).cast(schema))
        written += batch.num_rows
    if writer is None:  # an empty result is still a readable table
        pq.write_table(schema.empty_table(), directory / part_file(0))
    else:
        writer.close()
    return written


class _PartWriter:
    def __init__(self, file: Path, schema: pa.Schema):
        self._writer = pq.ParquetWriter(file, schema)
        self.rows = 0

    def write(self, table: pa.Table) -> None:
        self._writer.write_table(table)
        self.rows += table.num_rows

    def close(self) -> None:
        self._writer.close()
