"""One `kn-ray attribute` output directory as the downstream stages see it.

Layout: `run.json`, then one folder of `part-*.parquet` files per table (prompts, neurons,
activations; later knowledge_neurons, relation_neurons, edits) and `aggregate.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

# The attribute stage keeps neuron rows with score >= 0.1 x the prompt's max and activation
# rows with activation >= 0.5 x the prompt's max; run.json may state other ratios.
DEFAULT_KEEP = {"ig": 0.1, "activation": 0.5}
KEEP_KEYS = {  # where run.json may state each keep ratio, first match wins
    "ig": (("keep", "score_ratio"), ("keep", "score"), ("keep", "ratio"), ("keep_ratio",), ("score_keep_ratio",)),
    "activation": (("keep", "activation_ratio"), ("keep", "activation"), ("activation_keep_ratio",)),
}
MODEL_KEYS = (("model", "name"), ("model",), ("model_name",))
REVISION_KEYS = (("model", "revision"), ("revision",))
INPUT_KEYS = (("input", "name"), ("input", "path"), ("input",), ("facts",))


def _lookup(config: dict, paths) -> object | None:
    for path in paths:
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            return node
    return None


class RunDir:
    """Paths, configuration and table discovery for one output directory."""

    def __init__(self, out: str | os.PathLike):
        self.path = Path(out)
        if not self.path.is_dir():
            raise FileNotFoundError(f"{self.path}: no such output directory (expected the OUT of `kn-ray attribute`)")

    def table_dir(self, table: str) -> Path:
        return self.path / table

    def has(self, table: str) -> bool:
        return any(self.table_dir(table).glob("part-*.parquet"))

    def glob(self, table: str) -> str:
        """The parquet glob of a table, after checking it has part files."""
        if not self.has(table):
            raise FileNotFoundError(f"{self.table_dir(table)}: no part-*.parquet files")
        return str(self.table_dir(table) / "part-*.parquet")

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
        value = _lookup(self.config, KEEP_KEYS[method])
        return float(value) if value is not None else DEFAULT_KEEP[method]

    @property
    def model_label(self) -> str:
        name = _lookup(self.config, MODEL_KEYS) or "unknown model"
        revision = _lookup(self.config, REVISION_KEYS)
        return f"{name}@{str(revision)[:12]}" if revision else str(name)

    @property
    def input_label(self) -> str:
        value = _lookup(self.config, INPUT_KEYS)
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
