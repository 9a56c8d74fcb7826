"""kn-ray report: every figure present, embedded and captioned with model and thresholds."""

from __future__ import annotations

import re

import matplotlib.pyplot as plt
import matplotlib.text
import pytest
from PIL import Image

from kn_ray.interfaces.cli import main as cli
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.stages.report.analytics import Analytics
from kn_ray.stages.report.html import build_sections, describe, write_report
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
