"""One `kn-ray attribute` output directory as the downstream stages see it (docs/output-schema.md).

Layout: `run.json`, one folder of `part-*.parquet` files per table (prompts, neurons,
activations; later knowledge_neurons, relation_neurons, edits), `_shards/part-NNNNN.json`
done markers of the attribute tables, and `aggregate.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ATTRIBUTE_TABLES = ("prompts", "neurons", "activations")  # written per shard, each shard marked done
MARKERS = "_shards"
# Keep policy of the attribute stage: neuron rows with score >= ratio x the prompt's max,
# activation rows with activation >= activation_ratio x max; dense runs keep every neuron.
DEFAULT_KEEP = {"ig": 0.1, "activation": 0.5}
KEEP_KEYS = {"ig": ("identity", "keep", "ratio"), "activation": ("identity", "keep", "activation_ratio")}
DENSE_KEY = ("identity", "keep", "dense")
MODEL_KEY = ("identity", "model")
REVISION_KEY = ("identity", "model_info", "revision")
INPUT_KEY = ("input_path",)


def _lookup(config: dict, path: tuple[str, ...]) -> object | None:
    node = config
    for key in path:
        node = node.get(key) if isinstance(node, dict) else None
    return node


class RunDir:
    """Paths, configuration and table discovery for one output directory."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such output directory (expected the OUT of `kn-ray attribute`)")

    def table_dir(self, table: str) -> Path:
        return self.path / table

    def parts(self, table: str) -> list[Path]:
        """The table's part files; for attribute tables only those a done marker names
        (`kn_ray.pipeline.rundir`: parts of unfinished or stale attempts are never read)."""
        if table in ATTRIBUTE_TABLES and (self.path / MARKERS).is_dir():
            from kn_ray.pipeline.rundir import RunDirectory

            return [Path(f) for f in RunDirectory(self.path).files(table)]
        return sorted(self.table_dir(table).glob("part-*.parquet"))

    def unmarked_parts(self, table: str) -> int:
        return len(list(self.table_dir(table).glob("part-*.parquet"))) - len(self.parts(table))

    def has(self, table: str) -> bool:
        return bool(self.parts(table))

    def files(self, table: str) -> list[str]:
        """The part files to read, after checking there is at least one."""
        parts = self.parts(table)
        if not parts:
            raise FileNotFoundError(f"{self.table_dir(table)}: no part-*.parquet files"
                                    + (" of finished shards" if (self.path / MARKERS).is_dir() else ""))
        return [str(p) for p in parts]

    def _json(self, name: str) -> dict:
        file = self.path / name
        if not file.exists():
            return {}
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{file}: invalid JSON ({error})") from None
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        return data

    @property
    def config(self) -> dict:
        """run.json, or {} if absent."""
        return self._json("run.json")

    @property
    def aggregate_config(self) -> dict:
        """aggregate.json written by `kn-ray aggregate`, or {} if absent."""
        return self._json("aggregate.json")

    def keep_ratio(self, method: str) -> float:
        if method == "ig" and _lookup(self.config, DENSE_KEY):
            return 0.0
        value = _lookup(self.config, KEEP_KEYS[method])
        return float(value) if value is not None else DEFAULT_KEEP[method]

    @property
    def model_label(self) -> str:
        name = _lookup(self.config, MODEL_KEY) or "unknown model"
        revision = _lookup(self.config, REVISION_KEY)
        return f"{name}@{str(revision)[:16]}" if revision else str(name)

    @property
    def input_label(self) -> str:
        value = _lookup(self.config, INPUT_KEY)
        return Path(str(value)).name if value else self.path.name


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory that replaces `target` only if the block succeeds."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp-{uuid.uuid4().hex[:12]}")
    tmp.mkdir()
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        os.replace(target, old)
    os.replace(tmp, target)
    shutil.rmtree(old, ignore_errors=True)


def write_json_atomic(file: Path, data: dict) -> None:
    tmp = file.with_name(f".{file.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, file)
