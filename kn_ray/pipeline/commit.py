"""The commit protocol of the attribute tables: each shard exactly once, on any filesystem.

Object stores have no rename, so none is needed: each attempt at a shard writes its parts
under names unique to the attempt (`write_parts`, on a worker or the driver), the driver then
checks them and writes the marker naming exactly those objects (`commit`: a single PUT, or on
a local disk a fsynced temporary file renamed), and readers and resume trust only what a
marker names (`markers`, `finished`). A marker is replaced, never appended to, so a shard has
one committed copy whatever was retried or duplicated. Parts no marker names are stale
attempts, removed at the start and end of a run (`remove_stale`).
"""

from __future__ import annotations

import json
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq
import pyarrow.fs as pafs

from .layout import MARKERS, PART, SHARD_KINDS, attempt_part, marker_file, marker_shard
from .storage import Storage
from .neuron_tables import KINDS

METADATA_KEY = b"kn_ray"  # every part's key-value metadata: the run's config_hash, the attempt, ...
IO_THREADS = 16  # parallel small reads (markers, footers): object stores answer each in ~10-50 ms


class CommitError(RuntimeError):
    """The parts an attempt reported are not what the filesystem holds."""


@dataclass(frozen=True)
class Part:
    file: str  # relative to OUT
    rows: int
    bytes: int


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


class Commits:
    """Parts, markers and resume of one run directory's shards."""

    def __init__(self, storage: Storage):
        self.storage = storage

    # ---- write (worker or driver), commit (driver) ---------------------------------------------
    def write_parts(self, shard: str, attempt: str, tables: dict[str, pa.Table], metadata: dict) -> dict[str, Part]:
        """Write one attempt's parts (no marker); returns what was written."""
        store = self.storage
        meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        parts = {}
        for kind in tables:
            name = attempt_part(kind, shard, attempt)
            path = store.path(name)
            table = tables[kind].replace_schema_metadata(meta)
            if store.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pq.write_table(table, path)
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
                size = os.stat(path).st_size
            else:
                pq.write_table(table, path, filesystem=store.fs)
                size = None
            parts[kind] = Part(name, table.num_rows, size)
        if not store.local:  # one listing call for the sizes (a HEAD each otherwise)
            sizes = store.sizes([p.file for p in parts.values()])
            parts = {k: Part(p.file, p.rows, sizes[p.file]) for k, p in parts.items()}
        return parts

    def commit(self, shard: str, attempt: str, parts: dict[str, Part], run_hash: str, kinds=KINDS) -> dict:
        """Check that the attempt's parts (one of each of `kinds`: the run's mode) exist with the
        reported sizes, then write the marker; returns it."""
        if set(parts) != set(kinds):
            raise CommitError(f"{shard}: attempt {attempt} reported parts {sorted(parts)}, not {list(kinds)}")
        sizes = self.storage.sizes([p.file for p in parts.values()])
        for kind, part in parts.items():
            if part.file != attempt_part(kind, shard, attempt) or sizes[part.file] != part.bytes:
                raise CommitError(f"{shard}: {part.file} holds {sizes[part.file]} bytes, "
                                  f"the attempt reported {part.bytes}")
        done = dict(shard=shard, attempt=attempt, config_hash=run_hash,
                    files={k: p.file for k, p in parts.items()},
                    rows={k: p.rows for k, p in parts.items()}, bytes={k: p.bytes for k, p in parts.items()})
        self.storage.write_bytes(json.dumps(done, sort_keys=True).encode(), MARKERS, marker_file(shard))
        return done

    def write_shard(self, shard: str, tables: dict[str, pa.Table], run_hash: str, metadata: dict,
                    attempt: str | None = None) -> dict:
        """Write and commit one shard in this process (a new attempt, unless one is given);
        returns its marker."""
        attempt = attempt or new_attempt()
        parts = self.write_parts(shard, attempt, tables, dict(metadata, config_hash=run_hash, attempt=attempt))
        return self.commit(shard, attempt, parts, run_hash, kinds=tuple(tables))

    # ---- read --------------------------------------------------------------------------------
    def marker(self, shard: str) -> dict | None:
        """The shard's marker, or None (none, or unreadable: the shard is recomputed)."""
        try:
            return self.storage.read_json(MARKERS, marker_file(shard))
        except ValueError:
            return None

    def markers(self, run_hash: str) -> dict[str, dict]:
        """Shard name -> marker of every marked shard of the run `run_hash`."""
        names = sorted(filter(None, (marker_shard(i.path) for i in self.storage.listing(MARKERS))))
        with ThreadPoolExecutor(IO_THREADS) as pool:
            found = dict(zip(names, pool.map(self.marker, names)))
        return {n: m for n, m in found.items() if m is not None and m.get("config_hash", "") == run_hash}

    def finished(self, shards: list[str], run_hash: str) -> dict[str, dict]:
        """The shards among `shards` that are whole: marker of this run, each named part of the
        marked size, with a readable footer of the marked row count and this run's hash."""
        with ThreadPoolExecutor(IO_THREADS) as pool:
            checked = dict(zip(shards, pool.map(lambda s: self._check(s, run_hash), shards)))
        return {s: m for s, m in checked.items() if m is not None}

    def _check(self, shard: str, run_hash: str) -> dict | None:
        done, fs = self.marker(shard), self.storage.fs
        try:
            if done is None or done["config_hash"] != run_hash:
                return None
            for kind in done["files"]:
                path = self.storage.path(done["files"][kind])
                info = fs.get_file_info(path)
                if info.type != pafs.FileType.File or info.size != done["bytes"][kind]:
                    return None
                meta = pq.read_metadata(path, filesystem=fs)
                stored = json.loads(meta.metadata[METADATA_KEY])
                if meta.num_rows != done["rows"][kind] or stored["config_hash"] != run_hash:
                    return None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
        return done

    def committed(self, kind: str, markers: dict[str, dict]) -> list[str]:
        """Paths (in the filesystem) of the parts of `kind` that `markers` name, in shard order."""
        return [self.storage.path(markers[s]["files"][kind]) for s in sorted(markers) if kind in markers[s]["files"]]

    def remove_stale(self, markers: dict[str, dict]) -> int:
        """Keep the shards of `markers`, delete the rest: the attribute parts no kept marker names
        (failed, lost or duplicated attempts), markers that are not kept (damaged shards,
        recomputed next), and leftover temporary files; returns how many parts were deleted."""
        store = self.storage
        named = {store.path(f) for m in markers.values() for f in m["files"].values()}
        stale = [i.path for kind in SHARD_KINDS for i in store.listing(kind)
                 if i.path not in named and os.path.basename(i.path).startswith((PART, "."))]
        extra = [i.path for i in store.listing(MARKERS)
                 if os.path.basename(i.path).startswith(".")
                 or marker_shard(i.path) not in (None, *markers)]
        store.delete(extra + stale)  # markers first: a reader never sees a marker naming a deleted part
        return len(stale)
