"""`kn-ray report OUT`: a self-contained HTML corpus report with PNG figures.

Writes OUT/report/index.html (figures embedded as base64) and the same figures as PNG files
next to it. Edit sections appear once OUT/edits/ exists.
"""

from __future__ import annotations

import base64
import html
import io
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import pandas as pd

from kn_ray.choices import MEMORY_LIMIT
from kn_ray.pipeline.layout import REPORT, SUMMARIES
from kn_ray.pipeline.summary import plural
from kn_ray.stages.edit.criteria import MIN_UNITS, interval_text
from kn_ray.stages.edit.nothing import notes_text
from kn_ray.stages.edit.options import OPS
from kn_ray.stages.report import figures
from kn_ray.stages.report.analytics import ALL, Analytics
from kn_ray.stages.report.paper import paper_frame, paper_rows

EDIT_FIGURE_OPS = ("suppress", "amplify")


@dataclass
class Section:
    title: str
    figure: str | None = None  # PNG file name
    caption: str = ""
    tables: tuple[pd.DataFrame, ...] = ()
    note: str = ""
    items: tuple[str, ...] = ()  # a list under the note


def describe(context: dict) -> str:
    """Model, corpus slice and thresholds, for every caption."""
    params = context["parameters"]
    if not params:
        return f"Model {context['model']}; corpus {context['input']}; no {SUMMARIES['aggregate']} (run `kn-ray aggregate`)."
    adaptive = ", adapted per relation from there (see the chosen p table)" if params.get("adaptive") else ""
    return (f"Model {context['model']}; corpus {context['input']}: {plural(context['relations'], 'relation')}, "
            f"{plural(context['facts'], 'fact')}, {plural(context['usable_prompts'], 'usable prompt')}. Coarse neurons: score >= "
            f"{params.get('t')} x the prompt's max (ig), activation >= {params.get('activation_t')} x max "
            f"(activation). Knowledge neurons: coarse in >= max(p x usable prompts, {params.get('min_prompts')}) "
            f"prompts, p = {params.get('p')}{adaptive}. Relation neurons: >= {params.get('relation_share')} of the "
            f"relation's facts.")


def build_sections(analytics: Analytics, context: str) -> list[tuple[Section, object]]:
    """(section, matplotlib figure or None) in report order."""
    stats, reasons = analytics.run_stats(), analytics.skip_reasons()
    overlap, per_fact = overlap_comparison(analytics), analytics.neurons_per_fact()
    per_fact_caption = context + " Facts with a usable prompt; those with fewer than the minimum have none."
    overlap_caption = context + (" All pairs of facts with at least one knowledge neuron of the kind: every level "
                                 "(every candidate of the paper's rule, its Table 2) and fact level (the "
                                 "knowledge_neurons table by default).")
    return [
        (known_section(analytics), None),
        (Section("Knowledge neurons per layer", "layers.png", context),
         figures.layer_histogram(analytics.layer_histogram())),
        (Section("Knowledge neurons per fact", "per_fact.png", per_fact_caption,
                 (per_fact.groupby("method").n_neurons.describe().reset_index(),)),
         figures.neurons_per_fact(per_fact)),
        (levels_section(analytics), None),
        (consistency_section(analytics), None),
        (Section("Overlap within vs across relations", "overlap.png", overlap_caption, (overlap,), OVERLAP_NOTE),
         figures.overlap(overlap)),
        (Section("Run statistics", "run.png", context, (stats, reasons)),
         figures.run_statistics(stats, reasons)),
        (Section("Chosen p per relation", tables=(_chosen_p(analytics),)), None),
    ] + _edit_sections(analytics, context) + [
        (Section("The paper's table", note=PAPER_NOTE, tables=(paper_frame(paper_rows(analytics)),)), None),
    ]


PAPER_NOTE = ("Mean [95% bootstrap CI over facts; update and erase: over edits] beside Dai et al. (2022) for "
              "BERT-base; suppress / amplify: mean over facts of the mean relative change of P over the fact's "
              "prompts, and the share of prompts whose top-1 prediction leaves (flip_rate: of those the model knew) "
              "or becomes (gain_rate: of those it did not) the gold object; update success counts a destructive "
              "edit (collateral perplexity grown past the bound) as a failure; fewer than "
              f"{MIN_UNITS} facts or edits give no interval (kn_ray.stages.report.paper).")


OVERLAP_NOTE = ("The paper's Table 2 compares every knowledge neuron of its rule; a fact-level neuron (rule 6, "
                "docs/downstream.md) is a knowledge neuron of one fact only, so fact-level sharing is 0 by "
                "construction. 'every level' counts every candidate (knowledge_neurons with shared_neuron_facts): "
                "the comparison with the paper. 'fact level' shows what the knowledge_neurons table shares.")
EVERY_LEVEL, FACT_LEVEL = "every level (the paper's rule)", "fact level"


def overlap_comparison(analytics: Analytics) -> pd.DataFrame:
    """The overlap of every candidate and of the fact-level neurons, side by side (column
    `neurons`); a run that cannot tell them apart shows knowledge_neurons as written."""
    parts = [analytics.overlap(neurons="all").assign(neurons=EVERY_LEVEL),
             analytics.overlap(neurons="fact").assign(neurons=FACT_LEVEL)]
    parts = [p for p in parts if len(p)] or [analytics.overlap().assign(neurons="knowledge_neurons as written")]
    frame = pd.concat(parts, ignore_index=True)
    return frame[["neurons"] + [c for c in frame.columns if c != "neurons"]]


def known_section(analytics: Analytics) -> Section:
    """What the model knows (probe.json), or why the run cannot say."""
    title = "What the model knows"
    probe, table = analytics.probe_summary(), analytics.probe()
    if table is None:
        return Section(title, note=f"This run has no {SUMMARIES['probe']}: it was made before the probe stage (or "
                                   "written by hand), so what the model knows was not measured and every ok prompt "
                                   "counts as usable.")
    unknown = "attributed too (--attribute-unknown)" if probe.get("attribute_unknown") else "not attributed"
    counted = ("counts them as usable too (--include-unknown)" if analytics.params.include_unknown else
               "leaves them out")
    note = (f"Every prompt was probed first (one forward pass). A prompt is known if {probe.get('rule')} (gold_rank: "
            f"1 = the model's top prediction); a fact is known with >= {probe.get('min_known_prompts')} known "
            f"prompts. Unknown prompts were {unknown}; aggregation {counted}. median P: the median P(gold) of the "
            f"relation's probed prompts; facts chosen: the known facts attributed.")
    return Section(title, note=note, tables=(table,))


GENERIC_SHOWN = 10


def levels_section(analytics: Analytics) -> Section:
    """Knowledge neurons per level and the generic neurons of the most facts."""
    title = "Levels: fact, relation, generic"
    levels = analytics.levels()
    if levels.empty:
        return Section(title, note="This run was aggregated before levels existed; re-run `kn-ray aggregate` "
                                   "to class its knowledge neurons.")
    summary = analytics.run.summary("aggregate") or {}
    kept = ", ".join(analytics.params.levels)
    note = (f"Each candidate neuron of the paper's rule is generic (a knowledge neuron of facts of several "
            f"relations, or of a large share of the run's facts), relation-level (of several facts of one relation) "
            f"or fact-level (of its fact alone) (rule 6, docs/downstream.md). knowledge_neurons keeps: {kept}; "
            f"shared_neurons lists the others." + (f" Note: {summary['levels_note']}." if summary.get("levels_note")
                                                     else ""))
    generic = pd.concat([analytics.generic_neurons(GENERIC_SHOWN, method) for method in ("ig", "activation")])
    items = tuple(f"L{r.layer} N{r.neuron}: knowledge neuron of {plural(r.n_facts, 'fact')} in "
                  f"{plural(r.n_relations, 'relation')} ({', '.join(r.relations)}; {r.method})"
                  for r in generic.itertuples())
    if items:
        note += f" The generic neurons of the most facts (at most {GENERIC_SHOWN} per method):"
    return Section(title, note=note, tables=(levels,), items=items)


def consistency_section(analytics: Analytics) -> Section:
    title = "Consistency of a fact's prompts"
    frame = analytics.consistency()
    if frame.empty:
        return Section(title, note="This run was aggregated before consistency existed; re-run `kn-ray aggregate`.")
    note = ("Per relation (ALL: the run): a fact's consistency is the mean Jaccard index of its usable prompts' "
            "coarse-neuron sets over pairs of prompts (1: every paraphrase lights the same neurons); facts: those "
            "with a consistency (2 or more usable prompts), the table fact_consistency (rule 7).")
    return Section(title, note=note, tables=(frame,))


def _chosen_p(analytics: Analytics) -> pd.DataFrame:
    chosen = (analytics.run.summary("aggregate") or {}).get("p_per_relation", {})
    rows = [{"method": method, "relation": relation, **values}
            for method, per_relation in chosen.items() for relation, values in per_relation.items()]
    return pd.DataFrame(rows)


def _edit_sections(analytics: Analytics, context: str) -> list[tuple[Section, object]]:
    if not analytics.has_edits():
        return [(Section("Knowledge editing", note=f"No {analytics.run.location('edits')} yet: the edit stage writes it; "
                                                   "this section then shows suppress / amplify effects."), None)]
    summary = analytics.edit_summary()
    sections = []
    for op in EDIT_FIGURE_OPS:
        if (summary.op == op).any():
            caption = context + f" Mean relative change (P_after - P_before) / P_before of {op} rows per condition."
            sections.append((Section(f"{op.capitalize()} knowledge neurons", f"edit_{op}.png", caption,
                                     (summary[(summary.op == op) & (summary.relation == ALL)],)),
                             figures.edit_effects(summary, op)))
    metrics = analytics.edit_metrics()
    if len(metrics):
        sections.append((Section("Update and erase metrics", tables=(metrics[metrics.relation == ALL],)), None))
    criteria = analytics.edit_criteria()
    if len(criteria):
        note = ("Per edit: reliability (the argmax flips as the op intends), generalization (the same on held-out "
                "templates, neurons from the others), locality (other facts' argmax unchanged), symmetry (the "
                "reversed fact of a symmetric relation), destructive (update / erase: the perplexity of other "
                "facts' prompts grew past the bound; such an edit counts as a failure in reliability and success); "
                f"mean over edits with a 95% bootstrap CI, none over fewer than {MIN_UNITS} edits "
                "(docs/experiments.md).")
        shown = criteria.assign(interval=[interval_text(lo, hi, n, "{:.3g}".format) for lo, hi, n in
                                          zip(criteria.ci_low, criteria.ci_high, criteria.n_edits)])
        shown = shown.drop(columns=["ci_low", "ci_high", "too_few"]).rename(columns={"interval": "95% CI"})
        sections.append((Section("Edits judged by today's criteria", note=note, tables=(shown,)), None))
    if not sections:  # an edits table without rows: the edit stage found nothing to edit
        runs = (analytics.run.summary("edit") or {}).get("runs", {})
        why = notes_text({op: runs[op]["note"] for op in sorted(runs, key=_op_order) if runs[op].get("note")})
        sections.append((Section("Knowledge editing", note=f"{analytics.run.location('edits')} has no rows. {why}"), None))
    return sections


def _op_order(op: str) -> tuple:
    return (OPS.index(op) if op in OPS else len(OPS), op)


def _png(fig, section: Section) -> bytes:
    """The figure as PNG; its title and caption (shown once, by the page) ride along as PNG text."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, metadata={"Title": section.title, "Description": section.caption})
    plt.close(fig)
    return buffer.getvalue()


def _section_html(section: Section, png: bytes | None) -> str:
    parts = [f"<section><h2>{html.escape(section.title)}</h2>"]
    if png is not None:
        data = base64.b64encode(png).decode()
        parts.append(f'<figure><img alt="{html.escape(section.title)}" src="data:image/png;base64,{data}">'
                     f"<figcaption>{html.escape(section.caption)} (also {html.escape(section.figure)})</figcaption></figure>")
    if section.note:
        parts.append(f'<p class="note">{html.escape(section.note)}</p>')
    if section.items:
        parts.append("<ul>" + "".join(f"<li>{html.escape(item)}</li>" for item in section.items) + "</ul>")
    parts += [table.to_html(index=False, float_format=lambda v: f"{v:.4g}", border=0) for table in section.tables]
    return "\n".join(parts) + "</section>"


STYLE = """body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;color:#222}
img{max-width:100%}figcaption,.note{font-size:.85em;color:#555}table{border-collapse:collapse;font-size:.8em;margin:.8em 0}
td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:right}"""


def write_report(out, memory_limit: str = MEMORY_LIMIT) -> Path | str:
    """Write OUT/report/ (index.html and PNGs); returns index.html's path (its URI off the local disk)."""
    analytics = Analytics(out, memory_limit)
    try:
        context = analytics.context()
        caption = describe(context)
        sections = build_sections(analytics, caption)
    finally:
        analytics.close()
    with analytics.run.staged(REPORT) as tmp:
        body = []
        for section, fig in sections:
            png = _png(fig, section) if fig is not None else None
            if png is not None:
                (tmp / section.figure).write_bytes(png)
            body.append(_section_html(section, png))
        title = f"Knowledge neurons of {context['model']} on {context['input']}"
        (tmp / "index.html").write_text(
            f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>"
            f"<p>{html.escape(caption)}</p>\n" + "\n".join(body) + "</body></html>\n")
    run = analytics.run
    return Path(run.path(REPORT, "index.html")) if run.local else run.location(REPORT, "index.html")
