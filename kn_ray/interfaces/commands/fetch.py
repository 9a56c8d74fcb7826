"""`kn-ray fetch NAME`: download and convert an embedded model into the cache."""

from __future__ import annotations

from dataclasses import dataclass

from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import add_command


@dataclass(frozen=True)
class FetchOptions:
    name: str = option("smollm2", "embedded model name", positional=True)


def register(sub) -> None:
    p = add_command(sub, "fetch", run, description=__doc__,
                    help="fetch and convert an embedded model (smollm2, gemma3-270m) into the cache")
    declared.add_flags(p, FetchOptions)


def run(args) -> int:
    from kn_ray.engine.embedded import EMBEDDED, ensure_embedded

    name = declared.from_args(FetchOptions, args).name
    if name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {name!r}; known: {', '.join(EMBEDDED)}")
    print(ensure_embedded(name))
    return 0
