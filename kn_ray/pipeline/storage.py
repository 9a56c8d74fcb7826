"""Files under one root on any filesystem (`uris.filesystem`): bytes and JSON written whole or
not at all, listings, and local folders published in one step. Knows no file names of its own
(those are `layout`'s) and no commit protocol (`commit`).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import pyarrow.fs as pafs

from .uris import filesystem, public_uri


class Storage:
    def __init__(self, uri: str | os.PathLike):
        self.uri = os.fspath(uri)
        self.fs, self.root = filesystem(self.uri)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)

    def __str__(self) -> str:
        return public_uri(self.uri)

    def path(self, *names: str) -> str:
        """The path of root/names in `self.fs`."""
        return "/".join([self.root, *names])

    def location(self, *names: str) -> str:
        """A public path or URI of root/names, for messages."""
        return "/".join([str(self).rstrip("/"), *names])

    def exists(self, *names: str) -> bool:
        return self.fs.get_file_info(self.path(*names)).type != pafs.FileType.NotFound

    def listing(self, *names: str, recursive: bool = False) -> list[pafs.FileInfo]:
        """The files below root/names (none if it does not exist)."""
        selector = pafs.FileSelector(self.path(*names), recursive=recursive, allow_not_found=True)
        return [i for i in self.fs.get_file_info(selector) if i.type == pafs.FileType.File]

    def sizes(self, files: list[str]) -> dict[str, int | None]:
        """Bytes of each of `files` (relative to root; None if missing), in one call."""
        infos = self.fs.get_file_info([self.path(f) for f in files])
        return {f: (i.size if i.type == pafs.FileType.File else None) for f, i in zip(files, infos)}

    def read_json(self, *names: str) -> dict | None:
        """The JSON object at root/names, or None if there is no such file."""
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
        """Delete files by their paths in `self.fs`; missing ones are no error."""
        for path in paths:
            try:
                self.fs.delete_file(path)
            except FileNotFoundError:
                pass

    @contextlib.contextmanager
    def staged(self, folder: str, replace=None):
        """A local directory whose files replace root/folder's when the block succeeds: the
        existing files `replace(name)` selects (default: all). Locally by renames (the whole
        folder swapped at once when all are replaced); elsewhere by uploads, then deletes of
        the replaced names not uploaded again (a reader may see the two sets mixed meanwhile)."""
        if self.local:
            target = self.path(folder)
            os.makedirs(os.path.dirname(target), exist_ok=True)
            tmp = tempfile.mkdtemp(prefix=f".{folder}.tmp-", dir=os.path.dirname(target))
        else:
            tmp = tempfile.mkdtemp(prefix=f"kn-ray-{folder}-")
        try:
            yield Path(tmp)
            self._publish(folder, tmp, replace)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def _publish(self, folder: str, tmp: str, replace) -> None:
        target = self.path(folder)
        new = sorted(os.listdir(tmp))
        old = [os.path.basename(i.path) for i in self.listing(folder)]
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
        """A local scratch directory (DuckDB spill space): inside root when root is local."""
        base = self.root if self.local else None
        if base is not None:
            os.makedirs(base, exist_ok=True)
        path = tempfile.mkdtemp(prefix=f".{prefix}-" if base else f"kn-ray-{prefix}-", dir=base)
        try:
            yield Path(path)
        finally:
            shutil.rmtree(path, ignore_errors=True)


@functools.lru_cache(maxsize=8)
def cached_storage(uri: str) -> Storage:
    """One Storage (one filesystem client) per URI and process: a worker reuses it for every shard."""
    return Storage(uri)
