"""Matplotlib figures of the corpus report, drawn from Analytics frames.

Each figure states the model, corpus slice and thresholds it came from in its caption, said
once: drawn in the figure with its title when the figure stands alone (explore's SVGs), or left
to the page when it sits under a heading and above a caption there (`caption=None`: the
report, whose PNG files keep title and caption as PNG text, `Title` and `Description`).
"""

from __future__ import annotations

import io
import re
import textwrap
import threading

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from kn_ray.pipeline.summary import plural  # noqa: E402
from kn_ray.stages.report.analytics import ALL  # noqa: E402

METHOD_COLORS = {"ig": "#0165fc", "activation": "#9a9a9a"}
CONDITION_ORDER = ["kn", "activation", "random", "other_relation"]


def _finish(fig, title: str, caption: str | None):
    if caption is None:  # the page shows title and caption
        fig.tight_layout()
        return fig
    fig.suptitle(title, fontsize=12, fontweight="bold")
    text = textwrap.fill(caption, int(fig.get_figwidth() * 17))
    fig.text(0.01, 0.01, text, fontsize=7, color="#444444", va="bottom")
    caption_height = (text.count("\n") + 1) * 9 + 8  # points: 7pt lines with spacing
    fig.tight_layout(rect=(0, caption_height / (fig.get_figheight() * 72), 1, 0.95))
    return fig


def _grouped_bars(ax, frame: pd.DataFrame, x: str, hue: str, y: str, colors: dict | None = None,
                  x_order=None, hue_order=None):
    """Bars of `y` at each value of `x`, one bar per `hue` value side by side."""
    table = frame.pivot_table(index=x, columns=hue, values=y, aggfunc="first")
    table = table.reindex(index=x_order or list(table.index), columns=hue_order or list(table.columns))
    width = 0.8 / max(len(table.columns), 1)
    positions = np.arange(len(table.index))
    for i, column in enumerate(table.columns):
        ax.bar(positions + (i - (len(table.columns) - 1) / 2) * width, table[column].fillna(0), width,
               label=str(column), color=(colors or {}).get(column))
    ax.set_xticks(positions, [str(v) for v in table.index])
    if len(table.columns):
        ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))


def _methods(frame: pd.DataFrame) -> list[str]:
    """ig first, then the baselines."""
    return sorted(frame.method.unique(), key=lambda m: (m != "ig", m))


def layer_histogram(frame: pd.DataFrame, caption: str | None = None):
    """Share of each method's knowledge neurons per layer (the paper's Figure 3)."""
    fig, ax = plt.subplots(figsize=(9, 4))
    frame = frame.assign(percent=frame.share * 100)
    _grouped_bars(ax, frame, "layer", "method", "percent", METHOD_COLORS, hue_order=_methods(frame))
    ax.set_xlabel("layer")
    ax.set_ylabel("% of the method's knowledge neurons")
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, "Knowledge neurons per layer", caption)


def neurons_per_fact(frame: pd.DataFrame, caption: str | None = None):
    fig, ax = plt.subplots(figsize=(9, 4))
    counts = frame.groupby(["method", "n_neurons"]).size().rename("facts").reset_index()
    top = int(counts.n_neurons.max()) if len(counts) else 0
    _grouped_bars(ax, counts, "n_neurons", "method", "facts", METHOD_COLORS, x_order=list(range(top + 1)),
                  hue_order=_methods(frame))
    means = frame.groupby("method").n_neurons.mean()
    ax.set_title("mean per fact: " + ", ".join(f"{m} {v:.2f}" for m, v in means.items()), fontsize=9)
    ax.set_xlabel("knowledge neurons of a fact")
    ax.set_ylabel("facts")
    return _finish(fig, "Knowledge neurons per fact", caption)


def overlap(frame: pd.DataFrame, caption: str | None = None):
    """Intra- vs inter-relation sharing of knowledge neurons (the paper's Table 2). A `neurons`
    column (the report's: every level vs fact level) splits each method's bars by it."""
    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    colors = {"intra": "#0165fc", "inter": "#f5a623"}
    if "neurons" in frame and len(frame):
        frame = frame.assign(group=frame.method + "\n" + frame.neurons)
        order = list(dict.fromkeys(frame.sort_values("method", key=lambda m: m != "ig", kind="stable").group))
    else:
        frame, order = frame.assign(group=frame.method), _methods(frame)
    for ax, column, label in [(axes[0], "mean_shared", "mean shared knowledge neurons"),
                              (axes[1], "mean_jaccard", "mean Jaccard of the neuron sets")]:
        _grouped_bars(ax, frame, "group", "pairs", column, colors, x_order=order, hue_order=["intra", "inter"])
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_title("fact pairs within (intra) / across (inter) relations", fontsize=9)
    return _finish(fig, "Overlap of facts' knowledge neurons", caption)


def run_statistics(stats: pd.DataFrame, reasons: pd.DataFrame, caption: str | None = None):
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), gridspec_kw={"width_ratios": [3, 2]})
    per_relation = stats[stats.relation != ALL].set_index("relation")
    bottom = np.zeros(len(per_relation))
    for status, color in [("ok", "#2ca02c"), ("skipped", "#ff7f0e"), ("error", "#d62728")]:
        axes[0].bar(per_relation.index, per_relation[status], bottom=bottom, label=status, color=color)
        bottom += per_relation[status].to_numpy()
    axes[0].set_ylabel("prompts")
    axes[0].tick_params(axis="x", rotation=90, labelsize=7)
    axes[0].legend(fontsize=8)
    total = stats[stats.relation == ALL].iloc[0]
    axes[0].set_title(f"{plural(int(total.prompts), 'prompt')}: {int(total.ok)} ok, {int(total.skipped)} skipped, "
                      f"{plural(int(total.error), 'error')}; {total.ok_per_compute_second:.2f} ok prompts per compute-second",
                      fontsize=9)
    if len(reasons):
        labels = [textwrap.shorten(f"{s}: {r}", 45) for s, r in zip(reasons.status, reasons.reason)]
        axes[1].barh(labels[::-1], reasons.n_prompts[::-1], color="#ff7f0e")
        axes[1].tick_params(axis="y", labelsize=7)
    else:
        axes[1].text(0.5, 0.5, "no skipped or failed prompts", ha="center", va="center")
        axes[1].set_axis_off()
    axes[1].set_title("reasons for skipped / failed prompts", fontsize=9)
    return _finish(fig, "Run statistics", caption)


def edit_effects(summary: pd.DataFrame, op: str, caption: str | None = None):
    """Mean relative change of the gold probability per condition, overall and per relation."""
    frame = summary[summary.op == op].assign(percent=lambda f: f.mean_rel_change * 100)
    relations = [ALL] + sorted(r for r in frame.relation.unique() if r != ALL)
    present = set(frame.condition)
    conditions = [c for c in CONDITION_ORDER if c in present] + sorted(present - set(CONDITION_ORDER))
    fig, ax = plt.subplots(figsize=(max(8, len(relations) * 0.6), 4))
    _grouped_bars(ax, frame, "relation", "condition", "percent", x_order=relations, hue_order=conditions)
    ax.axhline(0, color="black", linewidth=0.8)
    ax.set_ylabel("mean relative change of P(gold), %")
    ax.tick_params(axis="x", rotation=90, labelsize=7)
    ax.grid(True, axis="y", alpha=0.3)
    return _finish(fig, f"{op.capitalize()} knowledge neurons: effect on the gold probability", caption)


DRAWING = threading.Lock()  # pyplot's state is global: one figure is drawn at a time


def svg(fig) -> str:
    """The figure as an SVG document (text kept as text: small and searchable), closed after."""
    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none"}):
        fig.savefig(buffer, format="svg")
    plt.close(fig)
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    return re.sub(r'^<svg([^>]*?) width="[^"]*" height="[^"]*"', r"<svg\1", text, count=1)  # scales to its box
