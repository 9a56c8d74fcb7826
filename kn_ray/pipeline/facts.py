"""Reading facts: a PARAREL-layout directory or our JSON Lines format.

Readers never raise for a bad record: they yield a `BadRecord` with the reason, so one
broken line becomes one error row of the run instead of stopping it. Files are read as
bytes and decoded line by line, so broken UTF-8 costs one line, not the file.

JSON Lines format, one fact a line::

    {"id": "f1", "relation": "capital", "subject": "France", "object": "Paris",
     "templates": ["The capital of [X] is [Y] ."]}          # or
    {"id": "f2", "relation": "capital", "subject": "Japan", "object": "Tokyo",
     "prompts": ["The capital of Japan is"], "target": " Tokyo"}   # target optional
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kn_ray.fields import option

FORMATS = ("auto", "pararel", "jsonl")
FACT_FIELDS = ("id", "relation", "subject", "object")


@dataclass(frozen=True)
class Fact:
    fact_id: str
    relation: str
    subject: str
    object: str
    templates: tuple[str, ...] = ()  # patterns with [X] and [Y]
    prompts: tuple[str, ...] = ()  # ready prompts ([MASK] for masked LMs)
    target: str | None = None  # overrides the target derived from the text before [Y]
    where: str = ""  # 'file:line', for messages


@dataclass(frozen=True)
class BadRecord:
    """An input line that cannot become a fact; `where` is 'file:line'."""

    where: str
    reason: str
    relation: str = ""
    fact_id: str = ""
    subject: str = ""
    object: str = ""


@dataclass(frozen=True)
class Filters:
    relations: tuple[str, ...] = option((), "comma-separated relations to keep (default: all)")
    max_facts_per_relation: int | None = option(None, "at most this many facts per relation (default: all)")
    max_templates: int | None = option(None, "templates per fact (the first usable ones; default: all)")

    def as_dict(self) -> dict:
        return dict(relations=list(self.relations), max_facts_per_relation=self.max_facts_per_relation,
                    max_templates=self.max_templates)


@dataclass
class FactSet:
    facts: list[Fact] = field(default_factory=list)
    bad: list[BadRecord] = field(default_factory=list)

    def require(self, where: str, filters: Filters = Filters()) -> "FactSet":
        """Self, or a ValueError saying that `where` holds no fact record (under `filters`)."""
        if self.facts or self.bad:
            return self
        chosen = f" of the relations {', '.join(filters.relations)}" if filters.relations else ""
        raise ValueError(f"{where}: no facts{chosen}, so no prompts: nothing to do. Give a PARAREL folder "
                         "(facts/, templates/) or a JSON Lines file with one fact per line (docs/pipeline.md)")


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "facts").is_dir() and (path / "templates").is_dir():
            return "pararel"
        raise ValueError(f"{path} is a directory without facts/ and templates/ (the PARAREL layout)")
    if path.is_file():
        return "jsonl"
    raise FileNotFoundError(f"facts not found: {path}")


def read_facts(path: str | Path, fmt: str = "auto", filters: Filters = Filters()) -> FactSet:
    """Facts and bad records from `path`, filtered, in input order."""
    path = Path(path)
    if fmt not in FORMATS:
        raise ValueError(f"unknown facts format {fmt!r}; choose from {', '.join(FORMATS)}")
    fmt = detect_format(path) if fmt == "auto" else fmt
    records = _read_pararel(path, filters.relations) if fmt == "pararel" else _read_jsonl(path)
    return _filter(_dedupe(records), filters)


# ---- line level ---------------------------------------------------------------------------
def json_lines(path: Path, label: str) -> Iterator[tuple[str, dict | BadRecord]]:
    """(where, object or BadRecord) for every non-blank line of a JSON Lines file."""
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            where = f"{label}:{number}"
            if not raw.strip():
                continue
            yield where, _parse_line(raw, where)


def _parse_line(raw: bytes, where: str) -> dict | BadRecord:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return BadRecord(where, f"broken unicode: {error.reason} at byte {error.start}")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        return BadRecord(where, f"malformed JSON: {error.msg} (column {error.colno})")
    if not isinstance(value, dict):
        return BadRecord(where, f"expected a JSON object, got {type(value).__name__}")
    return value


def text_problem(name: str, value) -> str | None:
    """Why `value` cannot be the text field `name` of a fact (missing, not a string, empty,
    unencodable), or None; the prompt builder checks templates and prompts with it too."""
    if not isinstance(value, str):
        return f"missing field {name!r}" if value is None else f"field {name!r} must be a string"
    if not value.strip():
        return f"empty {name!r}"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return f"broken unicode in {name!r} (lone surrogate)"
    return None


# ---- our JSON Lines format ----------------------------------------------------------------------
def _read_jsonl(path: Path) -> Iterator[Fact | BadRecord]:
    for where, value in json_lines(path, path.name):
        yield value if isinstance(value, BadRecord) else _jsonl_fact(value, where)


def _jsonl_fact(value: dict, where: str) -> Fact | BadRecord:
    fields = {name: value.get(name) for name in FACT_FIELDS}
    partial = {k: v for k, v in zip(("fact_id", "relation", "subject", "object"), fields.values()) if isinstance(v, str)}
    for name, field_value in fields.items():
        if problem := text_problem(name, field_value):
            return BadRecord(where, problem, **partial)
    templates, prompts, target = value.get("templates"), value.get("prompts"), value.get("target")
    if (templates is None) == (prompts is None):
        return BadRecord(where, "a fact needs exactly one of 'templates' or 'prompts'", **partial)
    texts = templates if templates is not None else prompts
    if not isinstance(texts, list) or not texts or not all(isinstance(t, str) for t in texts):
        return BadRecord(where, f"{'templates' if templates is not None else 'prompts'} must be a non-empty list of strings", **partial)
    if target is not None and (problem := text_problem("target", target)):
        return BadRecord(where, problem, **partial)
    kind = "templates" if templates is not None else "prompts"
    return Fact(fields["id"], fields["relation"], fields["subject"], fields["object"], target=target, where=where,
                **{kind: tuple(texts)})


# ---- PARAREL layout -----------------------------------------------------------------------------
def _read_pararel(root: Path, relations: tuple[str, ...]) -> Iterator[Fact | BadRecord]:
    names = sorted(p.stem for p in (root / "facts").glob("*.jsonl"))
    missing = [r for r in relations if r not in names]
    if missing:
        raise ValueError(f"relations not in {root}: {', '.join(missing)}")
    for relation in names:
        if relations and relation not in relations:
            continue
        templates, bad_templates = _pararel_templates(root / "templates" / f"{relation}.jsonl", relation)
        yield from bad_templates
        for where, value in json_lines(root / "facts" / f"{relation}.jsonl", f"facts/{relation}.jsonl"):
            if isinstance(value, BadRecord):
                yield BadRecord(value.where, value.reason, relation=relation)
            else:
                yield _pararel_fact(value, where, relation, templates)


def _pararel_templates(path: Path, relation: str) -> tuple[tuple[str, ...], list[BadRecord]]:
    if not path.is_file():
        return (), [BadRecord(f"templates/{relation}.jsonl", "no templates file for this relation", relation=relation)]
    good, bad = [], []
    for where, value in json_lines(path, f"templates/{relation}.jsonl"):
        if not isinstance(value, BadRecord) and (problem := text_problem("pattern", value.get("pattern"))):
            value = BadRecord(where, problem)
        if isinstance(value, BadRecord):
            bad.append(BadRecord(value.where, value.reason, relation=relation))
        else:
            good.append(value["pattern"])
    return tuple(good), bad


def _pararel_fact(value: dict, where: str, relation: str, templates: tuple[str, ...]) -> Fact | BadRecord:
    names = {"uuid": "fact_id", "sub_label": "subject", "obj_label": "object"}
    partial = {names[k]: value[k] for k in names if isinstance(value.get(k), str)}
    for name in names:
        if problem := text_problem(name, value.get(name)):
            return BadRecord(where, problem, relation=relation, **partial)
    return Fact(value["uuid"], relation, value["sub_label"], value["obj_label"], templates=templates, where=where)


# ---- dedupe and filters ----------------------------------------------------------------------
def _dedupe(records: Iterable[Fact | BadRecord]) -> Iterator[Fact | BadRecord]:
    seen: dict[str, str] = {}
    for record in records:
        if isinstance(record, Fact):
            if record.fact_id in seen:
                yield BadRecord(record.where, f"duplicate id {record.fact_id!r} (first at {seen[record.fact_id]})",
                                relation=record.relation, fact_id=record.fact_id, subject=record.subject, object=record.object)
                continue
            seen[record.fact_id] = record.where
        yield record


def _filter(records: Iterable[Fact | BadRecord], filters: Filters) -> FactSet:
    out = FactSet()
    per_relation: dict[str, int] = {}
    for record in records:
        if filters.relations and record.relation and record.relation not in filters.relations:
            continue
        if isinstance(record, BadRecord):
            out.bad.append(record)
            continue
        count = per_relation.get(record.relation, 0)
        if filters.max_facts_per_relation is None or count < filters.max_facts_per_relation:
            out.facts.append(record)
            per_relation[record.relation] = count + 1
    return out
