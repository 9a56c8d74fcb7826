"""`kn-ray report OUT`: the HTML corpus report of an aggregated run."""

from __future__ import annotations

from kn_ray.choices import MEMORY_LIMIT


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML corpus report with figures (after `kn-ray aggregate`)",
                       description="Writes OUT/report/index.html and PNG figures next to it.")
    p.add_argument("out", help="output directory of `kn-ray attribute`, aggregated: a path or URI")
    p.add_argument("--memory-limit", default=MEMORY_LIMIT, help=f"DuckDB memory limit (default {MEMORY_LIMIT})")
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.stages.report.html import write_report

    print(write_report(args.out, args.memory_limit))
    return 0
