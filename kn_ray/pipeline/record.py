"""run.json: what a run is (`identity`, which decides its results) and how it was asked for."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

from .layout import RUN_FILE


class RunConflict(ValueError):
    """OUT holds a different run (or something that is not a kn-ray run)."""


def config_hash(identity: dict) -> str:
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class RunRecord:
    """run.json: `identity` decides the results (a re-run with another identity is refused)."""

    identity: dict
    config_hash: str = ""  # "" only in the empty record of a directory without run.json
    input_path: str = ""
    model_source: str = ""
    created: str = ""
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, identity: dict, **fields) -> "RunRecord":
        """The record of `identity`, with its hash."""
        return cls(identity=identity, config_hash=config_hash(identity), **fields)

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

        saved = self.options.get("placement") or {}
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
