"""CLI flags and job-spec keys derived from the option declarations (`kn_ray.fields.option`).

`declared(cls)` lists every option of a dataclass, nested dataclasses included, with its
attribute path, spec section and key, CLI flag and default; `add_flags` turns them into
argparse arguments, `from_args` / `spec_from_args` read them back, and `from_spec` validates a
job-spec mapping against them and builds the dataclass. Unset flags and absent keys leave the
dataclass default in place, so defaults live only in the declarations.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from dataclasses import MISSING, dataclass

from kn_ray.fields import outside_choices

_SPEC_TYPES = {int: (int,), float: (int, float), str: (str,), bool: (bool,), tuple: (list,), list: (list,),
               dict: (dict,)}


class SpecError(ValueError):
    """A job spec that does not validate; the message names the key and the problem."""


@dataclass(frozen=True)
class Declared:
    path: tuple[str, ...]  # attributes from the root dataclass: ("keep", "ratio")
    section: str | None  # job-spec section (None: top level)
    key: str  # job-spec key
    flag: str | None  # CLI flag (None: job spec only)
    default: object  # MISSING: required
    hint: object  # the field's type annotation
    meta: dict

    @property
    def dest(self) -> str:
        return "__".join(self.path)

    @property
    def spec_types(self) -> tuple:
        return self.meta["types"] or tuple(t for base in _bases(self.hint) for t in _SPEC_TYPES.get(base, (base,)))

    @property
    def listed(self) -> bool:
        """A tuple or list of values (a comma-separated or repeated flag)."""
        return _bases(self.hint)[0] in (tuple, list)

    @property
    def required(self) -> bool:
        return self.default is MISSING


def declared(cls, path: tuple[str, ...] = (), section: str | None = None) -> list[Declared]:
    """Every declared option of `cls`, nested dataclass fields flattened, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        meta = f.metadata.get("option")
        if meta is None:
            continue
        nested = next((b for b in _bases(hints[f.name]) if dataclasses.is_dataclass(b)), None)
        if nested is not None:
            out += declared(nested, path + (f.name,), meta["section"] or section)
            continue
        key = meta["key"] or f.name
        flag = None if meta["flag"] is None else meta["flag"] or "--" + key.replace("_", "-")
        flag = "__".join(path + (f.name,)) if meta["positional"] else flag
        default = f.default if f.default_factory is MISSING else f.default_factory()
        out.append(Declared(path + (f.name,), meta["section"] or section, key, flag, default, hints[f.name], meta))
    return out


def _bases(hint) -> list:
    """The classes a type annotation admits, None left out: `int | None` -> [int]."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return [b for arg in typing.get_args(hint) for b in _bases(arg)]
    if hint is type(None):
        return []
    return [typing.get_origin(hint) or hint]


# ---- CLI ----------------------------------------------------------------------------------------
def add_flags(parser: argparse.ArgumentParser, cls, groups: dict[str, str] | None = None, *,
              defaults_from: str | None = None, skip: tuple[str, ...] = ()) -> None:
    """One argparse argument per declared option with a flag; `groups` titles sections.
    `defaults_from`: unset flags take their values from there (e.g. "the run's"), so no flag is
    required and the help says so (read them with `overrides`). `skip`: dests left out."""
    made: dict[str, argparse._ArgumentGroup] = {}
    for d in declared(cls):
        if d.flag is None or d.dest in skip:
            continue
        title = d.meta["group"] or (groups or {}).get(d.section or "")
        target = parser if title is None else made.setdefault(title, parser.add_argument_group(title))
        text = _help(d) if defaults_from is None else f"{d.meta['help']}; unset: {defaults_from}"
        if d.meta["positional"]:
            target.add_argument(d.dest, help=text, **_positional(d))
            continue
        cli = dict(d.meta["cli"])
        aliases = cli.pop("aliases", ())
        kwargs = dict(dest=d.dest, default=None, help=text, **{**_cli_type(d), **cli})
        if d.meta["choices"] is not None and not d.listed:  # a list's type checks each item
            kwargs.update(choices=d.meta["choices"], metavar=None)
        if d.required and defaults_from is None:
            kwargs["required"] = True
        target.add_argument(d.flag, *aliases, **kwargs)


def _positional(d: Declared) -> dict:
    """A positional argument: required unless it has a default (then it may be left out)."""
    kwargs = dict(d.meta["cli"])
    if not d.required:
        kwargs.update(nargs="?", default=None)
    if d.meta["choices"] is not None:
        kwargs["choices"] = d.meta["choices"]
    return kwargs


def _cli_type(d: Declared) -> dict:
    bases = _bases(d.hint)
    cli = d.meta["cli"]
    if d.listed and cli.get("action") in (None, "extend"):
        # "a,b" -> [a, b]; extend: repeatable
        return dict(type=_names(d.meta["choices"]), metavar=cli.get("metavar", d.key.upper()))
    if "action" in cli:
        return {}
    if "type" in cli:
        return dict(metavar=d.key.upper())
    if bases == [bool]:
        return dict(action="store_true")
    return dict(type=bases[0] if bases[0] in (int, float) else str, metavar=d.key.upper())


def _names(choices=None):
    """The type of a comma-separated flag value: "P17,P19" -> ["P17", "P19"], each one of
    `choices` when there are choices."""

    def names(text: str) -> list[str]:
        items = [part.strip() for part in text.split(",") if part.strip()]
        unknown = outside_choices(choices, items)
        if unknown is not None:
            raise argparse.ArgumentTypeError(f"{unknown!r} is not one of {', '.join(choices)}")
        return items

    return names


def _help(d: Declared) -> str:
    text = d.meta["help"]
    if d.default is MISSING or d.default is None or d.default is False or d.default == () or "default" in text or d.meta["cli"].get("action") == "store_const":
        return text
    shown = ",".join(map(str, d.default)) if isinstance(d.default, tuple) else d.default
    return f"{text} (default: {str(shown).lower() if isinstance(shown, bool) else shown})"


def from_args(cls, args: argparse.Namespace, **fixed):
    """The dataclass the parsed flags describe; unset flags keep their defaults, `fixed`
    overrides (field name -> value) at the top level."""
    tree: dict = {}
    for d in declared(cls):
        value = getattr(args, d.dest, None)
        if d.flag is not None and value is not None:
            _put(tree, d.path, _value(d, value))
    return _build(cls, tree, fixed)


def overrides(cls, args: argparse.Namespace) -> dict:
    """{dest: value} of the flags that were set (for flags added with `defaults_from`)."""
    return {d.dest: _value(d, getattr(args, d.dest)) for d in declared(cls)
            if d.flag is not None and getattr(args, d.dest, None) is not None}


def _value(d: Declared, value):
    return tuple(value) if _bases(d.hint)[0] is tuple else value


def spec_from_args(cls, args: argparse.Namespace) -> dict:
    """The job-spec mapping the parsed flags describe (unset flags are left out)."""
    spec: dict = {}
    for d in declared(cls):
        value = getattr(args, d.dest, None)
        if d.flag is not None and value is not None:
            (spec.setdefault(d.section, {}) if d.section else spec)[d.key] = value
    return spec


# ---- job specs ----------------------------------------------------------------------------------
def from_spec(cls, spec, **fixed):
    """Validate a job-spec mapping against the declarations (known sections and keys only, the
    declared types, required keys present) and build the dataclass."""
    options = declared(cls)
    sections = {d.section for d in options if d.section}
    tree: dict = {}
    missing = []
    for section in [None, *sorted(sections)]:
        mapping = _mapping(spec, section)
        mine = {d.key: d for d in options if d.section == section}
        allowed = set(mine) | (sections if section is None else set())
        unknown = sorted(set(mapping) - allowed, key=str)
        if unknown:
            where = f"section {section!r}" if section else "the spec"
            raise SpecError(f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; "
                            f"known: {', '.join(sorted(allowed))}")
        for key, d in mine.items():
            value = mapping.get(key)
            if value is None:
                missing += [key] if d.required else []
                continue
            _check_type(d, value)
            _check_choice(d, value)
            _put(tree, d.path, _value(d, value))
    if missing:
        raise SpecError(f"missing required key(s): {', '.join(missing)}")
    return _build(cls, tree, fixed)


def spec_defaults(cls) -> dict:
    """The job-spec mapping of every optional key at its default (docs/pipeline.md shows it)."""
    spec: dict = {}
    for d in declared(cls):
        if not d.required:
            value = list(d.default) if isinstance(d.default, tuple) else d.default
            (spec.setdefault(d.section, {}) if d.section else spec)[d.key] = value
    return spec


def _mapping(spec, section: str | None) -> dict:
    mapping = spec if section is None else (spec.get(section) or {})
    if not isinstance(mapping, dict):
        where = f"section {section!r}" if section else "the spec"
        raise SpecError(f"{where} must be a mapping, got {type(mapping).__name__}")
    return mapping


def _check_type(d: Declared, value) -> None:
    accepted = d.spec_types
    name = f"{d.section + '.' if d.section else ''}{d.key}"
    if not isinstance(value, accepted) or (isinstance(value, bool) and bool not in accepted):
        raise SpecError(f"{name} must be {' or '.join(t.__name__ for t in accepted)}, got {value!r}")
    if isinstance(value, list) and not all(isinstance(v, str) and v for v in value):
        raise SpecError(f"{name} must be a list of names, got {value!r}")


def _check_choice(d: Declared, value) -> None:
    unknown = outside_choices(d.meta["choices"], value)
    if unknown is not None:
        name = f"{d.section + '.' if d.section else ''}{d.key}"
        raise SpecError(f"{name} must be one of {', '.join(map(str, d.meta['choices']))}, got {unknown!r}")


def _put(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def _build(cls, tree: dict, fixed: dict | None = None):
    hints = typing.get_type_hints(cls)
    values = dict(tree)
    for f in dataclasses.fields(cls):
        nested = next((b for b in _bases(hints[f.name]) if dataclasses.is_dataclass(b)), None)
        if nested is not None and f.name in values:
            values[f.name] = _build(nested, values[f.name])
    return cls(**{**values, **(fixed or {})})
