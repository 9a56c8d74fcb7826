"""The output directory: run.json, Parquet parts, and the done markers that make resume safe.

Layout::

    OUT/run.json                         the run's configuration, written once
    OUT/prompts/part-NNNNN.parquet       one row per prompt
    OUT/neurons/part-NNNNN.parquet       one row per kept neuron
    OUT/activations/part-NNNNN.parquet   one row per kept activation
    OUT/_shards/part-NNNNN.json          done marker, written last: row counts and sizes

Every file is written to a temporary name, flushed and renamed, so a reader never sees a
half-written part, and a retry replaces a part instead of appending to it. A shard counts
as done only if its marker exists and every part matches it (readable footer, row count,
size, configuration hash); anything else is recomputed.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from .tables import KINDS, SCHEMAS

RUN_FILE = "run.json"
MARKERS = "_shards"
METADATA_KEY = b"kn_ray"


class RunConflict(ValueError):
    """OUT holds a different run (or something that is not a kn-ray run)."""


def config_hash(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path), fsync it, rename it to `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Store:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    def part(self, kind: str, shard_name: str) -> Path:
        return self.root / kind / f"{shard_name}.parquet"

    def marker(self, shard_name: str) -> Path:
        return self.root / MARKERS / f"{shard_name}.json"

    # ---- run.json -------------------------------------------------------------------------
    def refuse_conflict(self, identity: dict) -> dict | None:
        """Raise RunConflict if OUT holds another run or foreign files; returns the existing run
        record, if any. Compares only the keys of `identity`, so a partial one (known before the
        model loads) can refuse early."""
        run_file = self.root / RUN_FILE
        if run_file.is_file():
            existing = json.loads(run_file.read_text())
            old = {key: existing.get("identity", {}).get(key) for key in identity}
            if old != identity:
                raise RunConflict(f"{self.root} holds a run with a different configuration "
                                  f"({describe_difference(old, identity)}); "
                                  "use another output directory, or delete this one to start over")
            return existing
        if self.root.exists() and any(self.root.iterdir()):
            raise RunConflict(f"{self.root} is not empty and has no {RUN_FILE}: not a kn-ray run directory")
        return None

    def open_run(self, record: dict) -> dict:
        """Start the run `record` (holding `identity` and `config_hash`) or resume the same run."""
        existing = self.refuse_conflict(record["identity"])
        if existing is not None:
            return existing
        atomic_write(self.root / RUN_FILE, lambda tmp: tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n"))
        return record

    def read_run(self) -> dict:
        return json.loads((self.root / RUN_FILE).read_text())

    # ---- shards -----------------------------------------------------------------------------
    def write_shard(self, shard_name: str, tables: dict[str, pa.Table], metadata: dict) -> dict:
        """Write a shard's parts, then its marker; returns the marker."""
        self.marker(shard_name).unlink(missing_ok=True)
        meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        for kind in KINDS:
            table = tables[kind].replace_schema_metadata(meta)
            atomic_write(self.part(kind, shard_name), lambda tmp: pq.write_table(table, tmp))
        done = dict(shard=shard_name, config_hash=metadata["config_hash"],
                    rows={k: tables[k].num_rows for k in KINDS},
                    bytes={k: self.part(k, shard_name).stat().st_size for k in KINDS})
        atomic_write(self.marker(shard_name), lambda tmp: tmp.write_text(json.dumps(done, sort_keys=True)))
        return done

    def finished(self, shard_name: str, expected_hash: str) -> dict | None:
        """The shard's marker if the shard is whole and belongs to this run, else None."""
        try:
            done = json.loads(self.marker(shard_name).read_text())
            if done["config_hash"] != expected_hash:
                return None
            for kind in KINDS:
                path = self.part(kind, shard_name)
                if path.stat().st_size != done["bytes"][kind]:
                    return None
                meta = pq.read_metadata(path)
                stored = json.loads(meta.metadata[METADATA_KEY])
                if meta.num_rows != done["rows"][kind] or stored["config_hash"] != expected_hash:
                    return None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
        return done

    def done_shards(self) -> list[str]:
        run_hash = self.read_run()["config_hash"]
        names = sorted(p.stem for p in (self.root / MARKERS).glob("part-*.json"))
        return [name for name in names if self.finished(name, run_hash)]

    def read(self, kind: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """All finished shards' rows of `kind` ('prompts', 'neurons', 'activations'); `filters`
        as in `pyarrow.parquet.read_table` (e.g. [("fact_id", "in", ids)])."""
        paths = [self.part(kind, name) for name in self.done_shards()]
        tables = [pq.read_table(p, columns=columns, filters=filters).replace_schema_metadata(None) for p in paths]
        return pa.concat_tables(tables) if tables else SCHEMAS[kind].empty_table().select(columns or SCHEMAS[kind].names)


def describe_difference(old: dict, new: dict, prefix: str = "") -> str:
    """'key: old -> new' for every differing leaf of two nested dicts."""
    diffs = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            inner = describe_difference(a, b, f"{prefix}{key}.")
            diffs.extend([inner] if inner else [])
        elif a != b:
            diffs.append(f"{prefix}{key}: {a!r} -> {b!r}")
    return "; ".join(diffs)
