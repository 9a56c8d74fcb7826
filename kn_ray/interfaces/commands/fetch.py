"""`kn-ray fetch NAME`: download and convert an embedded model into the cache."""

from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("fetch", help="fetch and convert an embedded model (smollm2, gemma3-270m) into the cache")
    p.add_argument("name", nargs="?", default="smollm2", help="embedded model name (default: smollm2)")
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.engine.embedded import EMBEDDED, ensure_embedded

    if args.name not in EMBEDDED:
        raise ValueError(f"unknown embedded model {args.name!r}; known: {', '.join(EMBEDDED)}")
    print(ensure_embedded(args.name))
    return 0
