"""The dataset readers of the consumer contract (docs/output-schema.md): each opens a table
folder as given and counts its rows. tests/test_consumers.py and the circuits pipeline test
check every catalogued table with all of them."""

from __future__ import annotations

import duckdb
import pandas as pd
import polars as pl
import pyarrow.dataset as ds

READERS = {
    "pandas": lambda folder: len(pd.read_parquet(folder)),
    "pyarrow.dataset": lambda folder: ds.dataset(folder, format="parquet").count_rows(),
    "duckdb": lambda folder: duckdb.sql(f"SELECT count(*) FROM read_parquet('{folder}/*.parquet')").fetchall()[0][0],
    "polars": lambda folder: pl.scan_parquet(folder).select(pl.len()).collect().item(),
}


def assert_every_reader_counts(folder: str, rows: int) -> None:
    got = {reader: count(folder) for reader, count in READERS.items()}
    assert got == dict.fromkeys(READERS, rows), (folder, got, rows)
