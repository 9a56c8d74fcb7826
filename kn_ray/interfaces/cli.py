"""The `kn-ray` command line. Each subcommand lives in `kn_ray.interfaces.commands.<name>`
and exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from dataclasses import dataclass

from kn_ray import __version__
from kn_ray.fields import option
from kn_ray.interfaces import commands, declared


@dataclass(frozen=True)
class Program:
    """The options of `kn-ray` itself, before the subcommand."""

    version: bool = option(False, "print kn-ray's version and exit", action="version", version=f"kn-ray {__version__}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kn-ray", description="Knowledge neurons at corpus scale.")
    declared.add_flags(parser, Program)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        importlib.import_module(f"{commands.__name__}.{info.name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kn-ray: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, PermissionError, ValueError) as error:
        print(f"kn-ray {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
