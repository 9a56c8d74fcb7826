"""kn-ray report: every figure present, embedded and captioned with model and thresholds."""

from __future__ import annotations

import json
import re

import matplotlib.pyplot as plt
import pyarrow.parquet as pq
import matplotlib.text
import pytest
from PIL import Image

from kn_ray.interfaces.cli import main as cli
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.stages.report.analytics import Analytics
from kn_ray.stages.report.html import build_sections, describe, write_report
from kn_ray.stages.report.paper import paper_rows
from tests.synthetic import SyntheticSpec, write_synthetic_edits, write_synthetic_run

MODEL = "synthetic/bert-base-like"
CORE_FIGURES = {"layers.png", "per_fact.png", "overlap.png", "run.png"}
EDIT_FIGURES = {"edit_suppress.png", "edit_amplify.png"}


@pytest.fixture
def run(tmp_path):
    write_synthetic_run(tmp_path, SyntheticSpec(facts=150, relations=3, seed=1))
    aggregate(tmp_path, AggregateParams(adaptive=True))
    return tmp_path


def _captions(html: str) -> list[str]:
    return re.findall(r"<figcaption>(.*?)</figcaption>", html, flags=re.S)


def test_report_without_edits(run):
    index = write_report(run)
    html = index.read_text()
    assert {p.name for p in index.parent.glob("*.png")} == CORE_FIGURES
    assert html.count("data:image/png;base64,") == len(CORE_FIGURES)
    captions = _captions(html)
    assert len(captions) == len(CORE_FIGURES)
    for caption in captions:
        assert MODEL in caption and "0.2 x the prompt&#x27;s max" in caption and "p = 0.7, adapted per relation" in caption
    assert "No " in html and "edits yet" in html
    assert "Chosen p per relation" in html


def test_report_with_edits(run):
    write_synthetic_edits(run, facts=40)
    index = write_report(run)
    html = index.read_text()
    assert {p.name for p in index.parent.glob("*.png")} == CORE_FIGURES | EDIT_FIGURES
    assert html.count("data:image/png;base64,") == len(CORE_FIGURES | EDIT_FIGURES)
    assert "Update and erase metrics" in html and "success_rate" in html
    flips = re.search(r"<td>suppress: known prompts whose top-1 leaves the gold \(flip_rate\)</td>\s*<td>([^<]*)</td>", html)
    assert flips and re.fullmatch(r"\d+\.\d% \[\d+\.\d%, \d+\.\d%\]", flips[1]), flips  # a share, with its interval
    assert "(gain_rate)" in html and "flip_rate" in html
    assert not [p for p in run.iterdir() if p.name.startswith(".")]  # atomic swap left nothing behind


def test_each_caption_is_said_once_under_its_figure_and_kept_in_the_png_text(run):
    """The page shows title and caption; the figure draws neither (they were said twice, in the
    PNG and under it); each PNG file carries them as its Title and Description text."""
    write_synthetic_edits(run, facts=20)
    analytics = Analytics(run)
    caption = describe(analytics.context())
    assert "3 relations, 150 facts" in caption and "activation >= 0.5 x max" in caption
    sections = [(section, fig) for section, fig in build_sections(analytics, caption) if fig is not None]
    assert len(sections) == len(CORE_FIGURES | EDIT_FIGURES)
    for section, fig in sections:
        drawn = " ".join(t.get_text() for t in fig.findobj(matplotlib.text.Text))
        assert MODEL not in drawn and "p = 0.7" not in drawn and section.title not in drawn
        plt.close(fig)
    index = write_report(run)
    html = index.read_text()
    for section, _ in sections:
        assert html.count(f"<h2>{section.title}</h2>") == 1
        png = Image.open(index.parent / section.figure)
        assert png.text["Title"] == section.title and png.text["Description"] == section.caption
        assert MODEL in section.caption and "p = 0.7" in section.caption


def test_cli(run, tmp_path, capsys):
    fresh = tmp_path / "fresh"
    write_synthetic_run(fresh, SyntheticSpec(facts=5))
    assert cli(["report", str(fresh)]) == 2
    assert "run `kn-ray aggregate" in capsys.readouterr().err
    assert cli(["report", str(tmp_path / "missing")]) == 2
    assert cli(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("report/index.html")


@pytest.fixture
def probed(tmp_path):
    """A probed run whose unknown prompts were attributed (--attribute-unknown): status 'ok',
    known false; aggregation leaves them out, and so must the report."""
    out = tmp_path / "probed"
    write_synthetic_run(out, SyntheticSpec(facts=120, relations=3, seed=4, known_share=0.7, attribute_unknown=True))
    aggregate(out)
    return out


def test_report_shows_what_the_model_knows_levels_and_consistency(probed):
    summary = json.loads((probed / "aggregate.json").read_text())
    probe = json.loads((probed / "probe.json").read_text())
    analytics = Analytics(probed)
    context = analytics.context()
    assert 0 < summary["counts"]["unknown_prompts"]  # ok prompts left out as unknown
    assert context["usable_prompts"] == summary["counts"]["usable_prompts"]  # the aggregation's rule, not status 'ok'
    stats = analytics.run_stats().set_index("relation")
    assert stats.loc["ALL", "ok"] - stats.loc["ALL", "usable"] == summary["counts"]["unknown_prompts"]
    per_fact = analytics.neurons_per_fact()
    assert per_fact[per_fact.method == "ig"].usable_prompts.sum() == summary["counts"]["usable_prompts"]
    html = write_report(probed).read_text()
    assert "<h2>What the model knows</h2>" in html and "A prompt is known if top:1" in html
    for row in probe["relations"]:
        assert f"<td>{row['relation']}</td>\n      <td>{row['prompts']}</td>\n      <td>{row['known']}</td>" in html
    assert "<h2>Levels: fact, relation, generic</h2>" in html
    for level, n in summary["counts"]["ig"]["neurons_per_level"].items():
        assert re.search(rf"<td>ig</td>\s*<td>{level}</td>\s*<td>{n}</td>", html), level
    generic = pq.read_table(probed / "shared_neurons").to_pandas().query("level == 'generic'")
    assert len(generic)  # the always-on activation neurons at least
    for method, group in generic.groupby("method"):
        top = group.sort_values(["n_facts", "n_relations", "layer", "neuron"], ascending=[False, False, True, True]).iloc[0]
        assert (f"<li>L{top.layer} N{top.neuron}: knowledge neuron of {top.n_facts} facts in {top.n_relations} "
                f"relations ({', '.join(top.relations)}; {method})</li>" in html)
    assert "<h2>Consistency of a fact&#x27;s prompts</h2>" in html
    mean = summary["consistency"]["ig"]["ALL"]["mean"]
    assert re.search(rf"<td>ig</td>\s*<td>ALL</td>\s*<td>\d+</td>\s*<td>{mean:.4g}</td>", html)


def test_overlap_compares_every_level_with_the_paper_and_shows_fact_level_beside_it(probed):
    """Fact-level neurons are one fact's each: their sharing is 0 by construction. The paper's
    comparison counts every candidate (knowledge_neurons with shared_neuron_facts)."""
    analytics = Analytics(probed)
    every, fact = analytics.overlap(neurons="all"), analytics.overlap(neurons="fact")
    assert (fact.mean_shared == 0).all() and (fact.mean_jaccard == 0).all()
    ig = every[every.method == "ig"].set_index("pairs")
    assert ig.loc["intra", "mean_shared"] > ig.loc["inter", "mean_shared"] >= 0  # planted relation neurons
    assert ig.loc["intra", "mean_shared"] > 0
    kn = pq.read_table(probed / "knowledge_neurons").to_pandas()
    shared = pq.read_table(probed / "shared_neuron_facts").to_pandas()
    candidates = analytics.candidates()
    assert len(candidates) == len(kn) + len(shared) and set(shared.level) <= {"relation", "generic"}
    per_neuron = shared.groupby(["method", "layer", "neuron"]).fact_id.nunique().rename("n")
    neurons = pq.read_table(probed / "shared_neurons").to_pandas().set_index(["method", "layer", "neuron"])
    assert per_neuron.sort_index().tolist() == neurons.n_facts.sort_index().tolist()
    rows = {r["key"]: r for r in paper_rows(analytics)}
    assert rows["shared_intra"]["value"] == pytest.approx(ig.loc["intra", "mean_shared"])
    assert rows["shared_intra_fact"]["value"] == rows["shared_inter_fact"]["value"] == 0
    html = write_report(probed).read_text()
    assert "<td>every level (the paper's rule)</td>" in html and "<td>fact level</td>" in html
    assert "fact-level sharing is 0 by construction" in html


def test_report_of_a_run_without_a_probe_says_so(run):
    html = write_report(run).read_text()
    assert "<h2>What the model knows</h2>" in html and "has no probe.json" in html
