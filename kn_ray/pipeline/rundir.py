"""The run directory OUT, on any filesystem: its run.json, its tables and the later stages'
summaries, by the names of its catalogue (`layout`, docs/output-schema.md).

The pieces, each importable alone: `uris` (which filesystem a path or URI is on), `storage`
(files under a root), `record` (run.json), `commit` (shards committed exactly once, resume),
`layout` (every name). `RunDirectory` puts them together for the stages and the driver.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector

from .circuit_tables import CIRCUIT_SCHEMAS
from .known import PROBE
from .commit import Commits
from .layout import PART, RUN_FILE, SHARD_KINDS, SUMMARIES, TABLES, is_part
from .record import RunConflict, RunRecord, describe_difference
from .storage import Storage
from .neuron_tables import SCHEMAS as NEURON_SCHEMAS

SCHEMAS = {"probe": PROBE, **NEURON_SCHEMAS, **CIRCUIT_SCHEMAS}  # the attribute tables


class RunDirectory(Storage):
    def __init__(self, uri):
        super().__init__(uri)
        self.commits = Commits(self)

    # ---- run.json ----------------------------------------------------------------------------
    def record(self) -> RunRecord | None:
        data = self.read_json(RUN_FILE)
        return None if data is None else RunRecord.from_dict(data)

    @property
    def config(self) -> RunRecord:
        """run.json, or an empty record (none written yet)."""
        return self.record() or RunRecord(identity={})

    def refuse_conflict(self, identity: dict) -> RunRecord | None:
        """Raise RunConflict if OUT holds another run or foreign files; returns the existing
        record, if any. Compares only the keys of `identity`, so a partial one (known before the
        model loads) can refuse early."""
        existing = self.record()
        if existing is not None:
            old = {key: existing.identity.get(key) for key in identity}
            if old != identity:
                raise RunConflict(f"{self} holds a run with a different configuration "
                                  f"({describe_difference(old, identity)}); "
                                  "use another output directory, or delete this one to start over")
            return existing
        if self.fs.get_file_info(FileSelector(self.root, allow_not_found=True)):
            raise RunConflict(f"{self} is not empty and has no {RUN_FILE}: not a kn-ray run directory")
        return None

    def open_run(self, record: RunRecord) -> RunRecord:
        """Start the run `record` or resume the same run."""
        existing = self.refuse_conflict(record.identity)
        if existing is not None:
            return existing
        self.write_json(record.as_dict(), RUN_FILE)
        return record

    def require(self) -> "RunDirectory":
        """Self, if OUT exists, else FileNotFoundError."""
        if not self.exists(RUN_FILE) and not self.exists():
            raise FileNotFoundError(f"{self}: no such output directory (expected the OUT of `kn-ray attribute`)")
        return self

    # ---- tables ------------------------------------------------------------------------------
    def markers(self) -> dict[str, dict]:
        """Shard name -> marker of this run's committed shards (`commit`)."""
        return self.commits.markers(self.config.config_hash)

    def parts(self, table: str, required: bool = False) -> list[str]:
        """Paths (in `self.fs`) of the parts a reader of `table` reads: the committed ones of an
        attribute table, every part of a later stage's. `required`: FileNotFoundError if none."""
        if table in SHARD_KINDS:
            found = self.commits.committed(table, self.markers())
        else:
            found = sorted(i.path for i in self.listing(table) if is_part(i.path))
        if required and not found:
            raise FileNotFoundError(f"{self.location(table)}: no {PART}*.parquet files"
                                    + (" of finished shards" if table in SHARD_KINDS else ""))
        return found

    def tables(self) -> list[str]:
        """The catalogued tables OUT holds parts of, in catalogue order."""
        return [table for table in TABLES if self.parts(table)]

    def unmarked_parts(self, table: str) -> int:
        """Parts of an attribute table that no marker names (a run in progress, or killed)."""
        return len(self.listing(table)) - len(self.parts(table))

    def dataset(self, table: str) -> ds.Dataset:
        """A pyarrow dataset of `table`'s parts (streams; any filesystem; the first part's schema)."""
        return ds.dataset(self.parts(table), format="parquet", filesystem=self.fs)

    def read(self, table: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """The rows of `table` (attribute tables: committed shards only); `filters` as in
        `pyarrow.parquet.read_table` (e.g. [("fact_id", "in", ids)])."""
        files = self.parts(table, required=table not in SCHEMAS)
        if not files:
            return SCHEMAS[table].empty_table().select(columns or SCHEMAS[table].names)
        expression = pq.filters_to_expression(filters) if filters else None
        return ds.dataset(files, format="parquet", filesystem=self.fs).to_table(
            columns=columns, filter=expression).replace_schema_metadata(None)

    # ---- summaries beside the tables ---------------------------------------------------------
    def summary(self, stage: str) -> dict | None:
        """The JSON summary a stage wrote (`SUMMARIES`), or None."""
        return self.read_json(SUMMARIES[stage])

    def write_summary(self, stage: str, data: dict) -> None:
        self.write_json(data, SUMMARIES[stage])

    def summary_location(self, stage: str) -> str:
        return self.location(SUMMARIES[stage])
