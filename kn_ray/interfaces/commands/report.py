"""`kn-ray report OUT [OUT ...]`: the HTML corpus report of aggregated runs.

Writes OUT/report/index.html and PNG figures next to it, for each OUT. Given several runs (e.g.
two models), also prints the paper's table with one column per run (markdown), beside the
paper's BERT-base figures."""

from __future__ import annotations

from dataclasses import dataclass

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.fields import option
from kn_ray.interfaces import declared
from kn_ray.interfaces.commands import add_command


@dataclass(frozen=True)
class ReportOptions:
    out: tuple[str, ...] = option(help="output directory of `kn-ray attribute`, aggregated: a path or URI",
                                  positional=True, nargs="+")
    memory_limit: str = option(MEMORY_LIMIT, "DuckDB memory limit")
    table: str | None = option(None, "also write the paper's table (markdown, one column per run) to this file")


def register(sub) -> None:
    p = add_command(sub, "report", run, description=__doc__,
                    help="HTML corpus report with figures (after `kn-ray aggregate`)")
    declared.add_flags(p, ReportOptions)


def run(args) -> int:
    from kn_ray.stages.report.html import write_report
    from kn_ray.stages.report.paper import paper_markdown, paper_table

    options = declared.from_args(ReportOptions, args)
    for out in options.out:
        print(write_report(out, options.memory_limit))
    if len(options.out) > 1 or options.table:
        names = [str(out).rstrip("/").rsplit("/", 1)[-1] for out in options.out]
        if len(set(names)) < len(names):
            names = [str(out) for out in options.out]
        table = paper_markdown({name: paper_table(out, options.memory_limit)
                                for name, out in zip(names, options.out)})
        print(table)
        if options.table:
            with open(options.table, "w") as handle:
                handle.write(table)
    return 0
