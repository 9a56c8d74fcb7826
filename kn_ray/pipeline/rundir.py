"""The run directory, on any filesystem: reads and writes OUT by the names of its catalogue
(`layout`, docs/output-schema.md).

OUT is a local path or any URI `pyarrow.fs` resolves (`file://`, `s3://`, `gs://`, `hdfs://`),
else one fsspec resolves (wrapped in `PyFileSystem`). S3 endpoint and credentials come from
the standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...);
only `public_uri` (no user info, no query) is ever recorded.

The commit needs no rename, since object stores have none: each attempt at a shard writes its
parts under a name unique to the attempt, the driver then writes the marker naming exactly
those objects (a single PUT, or on a local disk a fsynced temporary file renamed), and readers
and resume trust only what a marker names. A marker is replaced, never appended to, so a
shard has one committed copy whatever was retried or duplicated. Parts no marker names are
stale attempts, removed at the start and end of a run (`remove_stale`).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from .layout import (LEGACY_SUMMARIES, MARKERS, PART, RUN_FILE, SHARD_KINDS, SUMMARIES, TABLES, attempt_part, is_part,
                     marker_file, marker_shard)
from .circuit_tables import CIRCUIT_SCHEMAS
from .tables import KINDS, SCHEMAS as NEURON_SCHEMAS

SCHEMAS = {**NEURON_SCHEMAS, **CIRCUIT_SCHEMAS}

METADATA_KEY = b"kn_ray"
IO_THREADS = 16  # parallel small reads (markers, footers): object stores answer each in ~10-50 ms



class RunConflict(ValueError):
    """OUT holds a different run (or something that is not a kn-ray run)."""


class CommitError(RuntimeError):
    """The parts an attempt reported are not what the filesystem holds."""


# ---- filesystems -------------------------------------------------------------------------------
def is_uri(uri: str | os.PathLike) -> bool:
    """A URI (`s3://b/run`, `file:///abs`), not a local path."""
    return "://" in os.fspath(uri)


def filesystem(uri: str | os.PathLike) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URI."""
    text = os.fspath(uri)
    if not is_uri(text):
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(text))
    try:
        fs, path = pafs.FileSystem.from_uri(text)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):  # a scheme pyarrow has no filesystem for
        import fsspec

        fs_, path = fsspec.core.url_to_fs(text)
        fs = pafs.PyFileSystem(pafs.FSSpecHandler(fs_))
    return fs, path.rstrip("/") or path


def is_local(uri: str | os.PathLike) -> bool:
    return isinstance(filesystem(uri)[0], pafs.LocalFileSystem)


def public_uri(uri: str | os.PathLike) -> str:
    """What may be recorded: an absolute local path, or the URI without user info and query."""
    text = os.fspath(uri)
    if not is_uri(text):
        return os.path.abspath(os.path.expanduser(text))
    parts = urlsplit(text)
    host = parts.hostname or ""
    netloc = f"{host}:{parts.port}" if parts.port else host
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def config_hash(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


def new_attempt() -> str:
    return uuid.uuid4().hex[:10]


# ---- run.json ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class RunRecord:
    """run.json: `identity` decides the results (a re-run with another identity is refused)."""

    identity: dict
    config_hash: str = ""  # "" only in hand-built test runs
    input_path: str = ""
    model_source: str = ""
    created: str = ""
    options: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: dict) -> "RunRecord":
        if not isinstance(data, dict) or not isinstance(data.get("identity"), dict):
            raise ValueError(f"{RUN_FILE}: expected an object with an 'identity' object")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def as_dict(self) -> dict:
        return asdict(self)

    def lookup(self, *keys: str):
        """identity[keys[0]][keys[1]]..., or None."""
        node = self.identity
        for key in keys:
            node = node.get(key) if isinstance(node, dict) else None
        return node

    @property
    def model(self) -> str | None:
        return self.lookup("model")

    def placement(self, **overrides):
        """How the run loaded its model (`options.placement`; the resolved precision and dtype from
        `identity.model_info`), with `overrides` (field -> value) on top. Another model forgets
        the recorded revision."""
        from kn_ray.placement import Placement, names

        saved = self.options.get("placement") or self.options  # hand-built runs record these keys flat
        values = {name: saved[name] for name in names() if saved.get(name) is not None}
        values["model"] = self.model or values.get("model")
        values.update({k: v for k in ("precision", "dtype") if (v := self.lookup("model_info", k))})
        if overrides.get("model") not in (None, values["model"]):
            values.pop("revision", None)
        values.update(overrides)
        if not values.get("model"):
            raise ValueError("no model; pass --model")
        return Placement(**values).check()

    @property
    def revision(self) -> str | None:
        return self.lookup("model_info", "revision")

    @property
    def precision(self) -> str | None:
        return self.lookup("model_info", "precision") or self.lookup("attribution", "precision")

    @property
    def dense(self) -> bool:
        return bool(self.lookup("keep", "dense"))

    def keep_ratio(self, method: str) -> float:
        """Rows below this share of the prompt's max were not stored (ig: `neurons`, activation)."""
        from .options import KeepPolicy

        if method == "ig":
            value = 0.0 if self.dense else self.lookup("keep", "ratio")
            return float(KeepPolicy.ratio if value is None else value)
        value = self.lookup("keep", "activation_ratio")
        return float(KeepPolicy.activation_ratio if value is None else value)

    @property
    def model_label(self) -> str:
        name, revision = self.model or "unknown model", self.revision
        return f"{name}@{str(revision)[:16]}" if revision else str(name)

    @property
    def input_label(self) -> str:
        return self.input_path.rstrip("/").rsplit("/", 1)[-1] if self.input_path else ""


@dataclass(frozen=True)
class Part:
    file: str  # relative to OUT
    rows: int
    bytes: int


# ---- the directory -----------------------------------------------------------------------------
class RunDirectory:
    def __init__(self, uri: str | os.PathLike):
        self.uri = os.fspath(uri)
        self.fs, self.root = filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return public_uri(self.uri)

    def path(self, *names: str) -> str:
        return "/".join([self.root, *names])

    def location(self, *names: str) -> str:
        """A public path or URI of something inside OUT, for messages."""
        return "/".join([str(self).rstrip("/"), *names])

    # ---- plain files ------------------------------------------------------------------------
    def exists(self, *names: str) -> bool:
        return self.fs.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def listing(self, *names: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """The files below OUT/names (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(*names), recursive=recursive, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def read_json(self, *names: str) -> dict | None:
        """The JSON object at OUT/names, or None if there is no such file."""
        try:
            with self.fs.open_input_stream(self.path(*names)) as stream:
                text = stream.read()
        except FileNotFoundError:
            return None
        except OSError:
            if not self.exists(*names):
                return None
            raise
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{self.location(*names)}: invalid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{self.location(*names)}: expected a JSON object")
        return data

    def write_json(self, data: dict, *names: str) -> None:
        self.write_bytes((json.dumps(data, indent=2, sort_keys=True) + "\n").encode(), *names)

    def write_bytes(self, data: bytes, *names: str) -> None:
        """Whole or not at all: locally a fsynced temporary file renamed, elsewhere one PUT."""
        target = self.path(*names)
        if not self.local:
            with self.fs.open_output_stream(target) as stream:
                stream.write(data)
            return
        os.makedirs(os.path.dirname(target), exist_ok=True)
        tmp = f"{os.path.dirname(target)}/.{os.path.basename(target)}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def delete(self, paths: list[str]) -> None:
        for path in paths:
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass

    # ---- run.json ---------------------------------------------------------------------------
    def record(self) -> RunRecord | None:
        data = self.read_json(RUN_FILE)
        return None if data is None else RunRecord.from_dict(data)

    @property
    def config(self) -> RunRecord:
        """run.json, or an empty record (a hand-built directory)."""
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
        selector = pafs.FileSelector(self.root, allow_not_found=True)
        if self.fs.get_file_info(selector):
            raise RunConflict(f"{self} is not empty and has no {RUN_FILE}: not a kn-ray run directory")
        return None

    def open_run(self, record: RunRecord) -> RunRecord:
        """Start the run `record` or resume the same run."""
        existing = self.refuse_conflict(record.identity)
        if existing is not None:
            return existing
        self.write_json(record.as_dict(), RUN_FILE)
        return record

    # ---- shards: write (worker or driver), commit (driver) -----------------------------------
    def write_parts(self, shard: str, attempt: str, tables: dict[str, pa.Table], metadata: dict) -> dict[str, Part]:
        """Write one attempt's parts (no marker); returns what was written."""
        meta = {METADATA_KEY: json.dumps(metadata, sort_keys=True).encode()}
        parts = {}
        for kind in tables:
            name = attempt_part(kind, shard, attempt)
            path = self.path(name)
            table = tables[kind].replace_schema_metadata(meta)
            if self.local:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                pq.write_table(table, path)
                with open(path, "rb+") as handle:
                    os.fsync(handle.fileno())
                size = os.stat(path).st_size
            else:
                pq.write_table(table, path, filesystem=self.fs)
                size = None
            parts[kind] = Part(name, table.num_rows, size)
        if not self.local:  # one listing call for the sizes (a HEAD each otherwise)
            sizes = self._sizes([p.file for p in parts.values()])
            parts = {k: Part(p.file, p.rows, sizes[p.file]) for k, p in parts.items()}
        return parts

    def _sizes(self, files: list[str]) -> dict[str, int | None]:
        infos = self.fs.get_file_info([self.path(f) for f in files])
        return {f: (i.size if i.type == pafs.FileType.File else None) for f, i in zip(files, infos)}

    def commit(self, shard: str, attempt: str, parts: dict[str, Part], run_hash: str, kinds=KINDS) -> dict:
        """Check that the attempt's parts (one of each of `kinds`: the run's mode) exist with the
        reported sizes, then write the marker."""
        if set(parts) != set(kinds):
            raise CommitError(f"{shard}: attempt {attempt} reported parts {sorted(parts)}, not {list(kinds)}")
        named = {k: Part(**p) if isinstance(p, dict) else p for k, p in parts.items()}
        sizes = self._sizes([p.file for p in named.values()])
        for kind, part in named.items():
            if part.file != attempt_part(kind, shard, attempt) or sizes[part.file] != part.bytes:
                raise CommitError(f"{shard}: {part.file} holds {sizes[part.file]} bytes, the attempt reported {part.bytes}")
        done = dict(shard=shard, attempt=attempt, config_hash=run_hash,
                    files={k: p.file for k, p in named.items()},
                    rows={k: p.rows for k, p in named.items()}, bytes={k: p.bytes for k, p in named.items()})
        self.write_bytes(json.dumps(done, sort_keys=True).encode(), MARKERS, marker_file(shard))
        return done

    # ---- shards: read ----------------------------------------------------------------------
    def marker(self, shard: str) -> dict | None:
        try:
            done = self.read_json(MARKERS, marker_file(shard))
        except ValueError:
            return None
        return done

    def markers(self, run_hash: str | None = None) -> dict[str, dict]:
        """Shard name -> marker of every marked shard (of the run `run_hash`, default run.json's)."""
        if run_hash is None:
            record = self.record()
            if record is None:
                return {}
            run_hash = record.config_hash
        names = sorted(filter(None, (marker_shard(i.path) for i in self.listing(MARKERS))))
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
        done = self.marker(shard)
        try:
            if done is None or done["config_hash"] != run_hash:
                return None
            for kind in done["files"]:
                path = self.path(done["files"][kind])
                info = self.fs.get_file_info(path)
                if info.type != pafs.FileType.File or info.size != done["bytes"][kind]:
                    return None
                meta = pq.read_metadata(path, filesystem=self.fs)
                stored = json.loads(meta.metadata[METADATA_KEY])
                if meta.num_rows != done["rows"][kind] or stored["config_hash"] != run_hash:
                    return None
        except (OSError, ValueError, KeyError, TypeError, pa.ArrowException):
            return None
        return done

    def files(self, kind: str, markers: dict[str, dict] | None = None) -> list[str]:
        """Paths (in `self.fs`) of the committed parts of `kind`, in shard order. A hand-built
        directory (run.json without a config_hash: tests, conversions) without any marker has
        no commit protocol: there every part counts."""
        if markers is None:
            record = self.record()
            markers = self.markers(record.config_hash if record else None)
            if not markers and record is not None and not record.config_hash:
                return sorted(i.path for i in self.listing(kind) if is_part(i.path))
        return [self.path(markers[s]["files"][kind]) for s in sorted(markers) if kind in markers[s]["files"]]

    def dataset(self, kind: str, files: list[str] | None = None) -> ds.Dataset:
        """A pyarrow dataset of the committed parts of `kind` (streams; any filesystem)."""
        files = self.files(kind) if files is None else files
        return ds.dataset(files, format="parquet", filesystem=self.fs)  # schema of the first part: sparse or dense

    def read(self, kind: str, columns: list[str] | None = None, filters=None) -> pa.Table:
        """The committed rows of `kind` ('prompts', 'neurons', 'activations'); `filters` as in
        `pyarrow.parquet.read_table` (e.g. [("fact_id", "in", ids)])."""
        files = self.files(kind)
        if not files:
            return SCHEMAS[kind].empty_table().select(columns or SCHEMAS[kind].names)
        expression = pq.filters_to_expression(filters) if filters else None
        return self.dataset(kind, files).to_table(columns=columns, filter=expression).replace_schema_metadata(None)

    def remove_stale(self, markers: dict[str, dict] | None = None) -> int:
        """Keep the shards of `markers` (default: every marker of this run), delete the rest: the
        attribute parts no kept marker names (failed, lost or duplicated attempts), markers that
        are not kept (damaged shards, recomputed next), and leftover temporary files; returns
        how many parts were deleted."""
        markers = self.markers() if markers is None else markers
        named = {self.path(f) for m in markers.values() for f in m["files"].values()}
        stale = [i.path for kind in SHARD_KINDS for i in self.listing(kind)
                 if i.path not in named and os.path.basename(i.path).startswith((PART, "."))]
        extra = [i.path for i in self.listing(MARKERS)
                 if os.path.basename(i.path).startswith(".")
                 or marker_shard(i.path) not in (None, *markers)]
        self.delete(extra + stale)  # markers first: a reader never sees a marker naming a deleted part
        return len(stale)


    # ---- tables of the later stages (aggregate, edit, report) --------------------------------
    def require(self) -> "RunDirectory":
        """Self, if OUT holds a run (its run.json), else FileNotFoundError."""
        if not self.exists(RUN_FILE) and not self.exists():
            raise FileNotFoundError(f"{self}: no such output directory (expected the OUT of `kn-ray attribute`)")
        return self

    def required_files(self, table: str) -> list[str]:
        """`table_files`, after checking there is at least one."""
        files = self.table_files(table)
        if not files:
            raise FileNotFoundError(f"{self.location(table)}: no {PART}*.parquet files"
                                    + (" of finished shards" if table in SHARD_KINDS else ""))
        return files

    def unmarked_parts(self, table: str) -> int:
        """Parts of an attribute table that no marker names (a run in progress, or killed)."""
        return len(self.listing(table)) - len(self.files(table))

    def table_files(self, table: str) -> list[str]:
        """Paths (in `self.fs`) of a table's parts: the committed ones of an attribute table,
        every part of any other."""
        if table in SHARD_KINDS:
            return self.files(table)
        return sorted(i.path for i in self.listing(table) if is_part(i.path))

    def has(self, table: str) -> bool:
        return bool(self.table_files(table))

    def tables(self) -> list[str]:
        """The catalogued tables OUT holds parts of, in catalogue order."""
        return [table for table in TABLES if self.has(table)]

    # ---- summaries beside the tables ------------------------------------------------------
    def summary(self, stage: str) -> dict | None:
        """The JSON summary a stage wrote (`SUMMARIES`), or None."""
        found = self.read_json(SUMMARIES[stage])
        if found is None and stage in LEGACY_SUMMARIES:
            found = self.read_json(*LEGACY_SUMMARIES[stage])
        return found

    def write_summary(self, stage: str, data: dict) -> None:
        """Write a stage's summary; a summary left inside a table folder by an older kn-ray is
        removed, so the folder holds Parquet parts only."""
        self.write_json(data, SUMMARIES[stage])
        if stage in LEGACY_SUMMARIES:
            self.delete([self.path(*LEGACY_SUMMARIES[stage])])

    def summary_location(self, stage: str) -> str:
        return self.location(SUMMARIES[stage])

    @contextlib.contextmanager
    def staged(self, table: str, replace=None):
        """A local directory whose files replace OUT/table's when the block succeeds: the
        existing files `replace(name)` selects (default: all). Locally by renames (the whole
        folder swapped at once when all are replaced); elsewhere by uploads, then deletes of
        the replaced names not uploaded again (a reader may see the two sets mixed meanwhile)."""
        if self.local:
            target = self.path(table)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{table}.tmp-", dir=os.path.dirname(target))
        else:
            tmp = tempfile.mkdtemp(prefix=f"kn-ray-{table}-")
        try:
            yield Path(tmp)
            self._publish(table, tmp, replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, table: str, tmp: str, replace) -> None:
        target = self.path(table)
        new = sorted(os.listdir(tmp))
        old = [os.path.basename(i.path) for i in self.listing(table)]
        dropped = [n for n in old if (replace is None or replace(n)) and n not in new]
        if self.local and replace is None:
            previous = f"{tmp}.old"
            if os.path.exists(target):
                os.replace(target, previous)
            os.replace(tmp, target)
            shutil.rmtree(previous, ignore_errors=True)
            return
        for name in new:
            source = os.path.join(tmp, name)
            if self.local:
                os.makedirs(target, exist_ok=True)
                os.replace(source, f"{target}/{name}")
            else:
                pafs.copy_files(source, f"{target}/{name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=self.fs)
        self.delete([f"{target}/{n}" for n in dropped])

    @contextlib.contextmanager
    def scratch(self, prefix: str):
        """A local scratch directory (DuckDB spill space): inside OUT when OUT is local."""
        base = self.root if self.local else None
        if base is not None:
            os.makedirs(base, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f".{prefix}-" if base else f"kn-ray-{prefix}-", dir=base)
        try:
            yield Path(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def opened(uri: str) -> RunDirectory:
    """One RunDirectory (one filesystem client) per URI and process (workers reuse it)."""
    return RunDirectory(uri)


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


def local_copy(uri: str, directory: str) -> str:
    """A local path for `uri`: itself if local, else a copy (file or directory tree) in `directory`."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        return path
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(f"facts not found: {public_uri(uri)}")
    target = os.path.join(directory, os.path.basename(path) or "facts")
    if info.type == pafs.FileType.Directory:
        pafs.copy_files(path, target, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    else:
        pafs.copy_files(path, target, source_filesystem=fs)
    return target


def read_text(uri: str | os.PathLike) -> str:
    """The text of one file at a local path or URI."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type != pafs.FileType.File:
        raise FileNotFoundError(f"no such file: {public_uri(uri)}")
    with fs.open_input_stream(path) as stream:
        return stream.read().decode()
