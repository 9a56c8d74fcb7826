"""`kn-ray report OUT [OUT ...]`: the HTML corpus report of aggregated runs; with several runs,
also the paper's table side by side (markdown)."""

from __future__ import annotations

from kn_ray.choices import MEMORY_LIMIT


def register(sub) -> None:
    p = sub.add_parser("report", help="HTML corpus report with figures (after `kn-ray aggregate`)",
                       description="Writes OUT/report/index.html and PNG figures next to it, for each OUT. "
                                   "Given several runs (e.g. two models), also prints the paper's table with "
                                   "one column per run, beside the paper's BERT-base figures.")
    p.add_argument("out", nargs="+", help="output directory of `kn-ray attribute`, aggregated: a path or URI")
    p.add_argument("--memory-limit", default=MEMORY_LIMIT, help=f"DuckDB memory limit (default {MEMORY_LIMIT})")
    p.add_argument("--table", help="also write the paper's table (markdown, one column per run) to this file")
    p.set_defaults(func=run)


def run(args) -> int:
    from kn_ray.stages.report.html import write_report
    from kn_ray.stages.report.paper import paper_markdown, paper_table

    for out in args.out:
        print(write_report(out, args.memory_limit))
    if len(args.out) > 1 or args.table:
        names = [str(out).rstrip("/").rsplit("/", 1)[-1] for out in args.out]
        if len(set(names)) < len(names):
            names = [str(out) for out in args.out]
        table = paper_markdown({name: paper_table(out, args.memory_limit) for name, out in zip(names, args.out)})
        print(table)
        if args.table:
            with open(args.table, "w") as handle:
                handle.write(table)
    return 0
