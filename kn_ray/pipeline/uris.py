"""Local paths and URIs: which filesystem holds them, and what of them may be recorded.

A URI is anything `pyarrow.fs` resolves (`file://`, `s3://`, `gs://`, `hdfs://`), else what
fsspec resolves (wrapped in `PyFileSystem`). S3 endpoint and credentials come from the
standard AWS environment (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_PROFILE`, ...); only
`public_uri` (no user info, no query) is ever recorded.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import pyarrow as pa
import pyarrow.fs as pafs


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
