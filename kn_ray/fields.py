"""Options declared once: a dataclass field that also says how the CLI and the job spec reach it.

    n_steps: int = option(20, "integration steps", section="attribution")

The dataclass default is the only default; `kn_ray.interfaces.declared` derives the argparse
flags (help, choices, the default shown in --help) and the job-spec keys, sections and
accepted types from these declarations. Fields declared with plain `field()` are not options.
"""

from __future__ import annotations

from dataclasses import MISSING, field, fields, is_dataclass


def option(default=MISSING, help: str = "", *, factory=MISSING, key: str | None = None, flag: str | None = "",
           positional: bool = False, choices=None, types: tuple | None = None, section: str | None = None,
           group: str | None = None, **cli):
    """A dataclass field with its option metadata.

    key      job-spec key (default: the field name); section: the spec section it sits in (a
             nested dataclass field names the section of all its fields)
    flag     CLI flag ("": --key-with-dashes; None: job spec only)
    positional  a positional CLI argument (named by the field) instead of a flag
    choices  accepted values (of each item, for a tuple or list)
    types    accepted job-spec types, where the annotation does not say (e.g. dict or str)
    group    argparse group title (default: the section)
    cli      extra argparse keywords (type, action, const, metavar, aliases)
    """
    meta = dict(help=help, key=key, flag=flag, positional=positional, choices=choices, types=types, section=section, group=group, cli=cli)
    return field(default=default, default_factory=factory, metadata={"option": meta})


def check_choices(options) -> None:
    """ValueError for a value outside its declared choices, in `options` or its nested dataclasses
    (argparse checks flags; this checks the job spec and the Python API alike)."""
    for f in fields(options):
        meta, value = f.metadata.get("option"), getattr(options, f.name)
        if is_dataclass(value):
            check_choices(value)
        elif meta:
            unknown = outside_choices(meta["choices"], value)
            if unknown is not None:
                raise ValueError(f"{f.name} must be one of {', '.join(map(str, meta['choices']))}, got {unknown!r}")


def outside_choices(choices, value):
    """The first of `value` (a value, or each item of a tuple or list) outside `choices`; None if none is."""
    if choices is None or value is None:
        return None
    return next((v for v in (value if isinstance(value, (tuple, list)) else [value]) if v not in choices), None)


def int_or_auto(text: str) -> int | str:
    """A CLI value that is a count or `auto` (n_steps, batch_prompts)."""
    import argparse

    from kn_ray.choices import AUTO

    if text == AUTO:
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'auto', got {text!r}") from None
