"""kn-ray explore: the queries against pandas over the same Parquet files, the pages through
Starlette's TestClient, run states (not a run, in progress, no aggregate), and URL tricks."""

from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from starlette.testclient import TestClient

from kn_ray.interfaces.cli import main as cli
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.neuron_tables import dense_schema
from kn_ray.stages.aggregate import AggregateParams
from kn_ray.stages.explore.app import create_app, fact_url
from kn_ray.stages.explore.options import ExploreOptions
from kn_ray.stages.explore.queries import Listing, RunQueries
from tests.s3_server import BUCKET, s3_server  # noqa: F401  (a fixture)
from tests.synthetic import SyntheticSpec, write_explorable_run, write_synthetic_run, write_tables

T = AggregateParams.t
LOCAL = "http://127.0.0.1:8765"  # the app answers loopback host names only


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return write_explorable_run(tmp_path_factory.mktemp("explore") / "run", facts=90, edited_facts=30, seed=3)


@pytest.fixture(scope="module")
def queries(run):
    q = RunQueries(RunDirectory(run))
    yield q
    q.close()


@pytest.fixture(scope="module")
def client(run):
    return TestClient(create_app(str(run), refresh=0), raise_server_exceptions=False, base_url=LOCAL)


def _read(run, table) -> pd.DataFrame:
    return pd.concat([pq.read_table(f).to_pandas() for f in sorted((run / table).glob("part-*.parquet"))])


def _coarse(run) -> pd.DataFrame:
    """(fact_id, prompt_id, layer, neuron, score) of the coarse rows of usable prompts, in pandas."""
    prompts = _read(run, "prompts")
    rows = _read(run, "neurons").merge(prompts[prompts.status == "ok"][["prompt_id", "max_score"]], on="prompt_id")
    return rows[rows.score >= T * rows.max_score]


def _edited_fact(run) -> str:
    edits = _read(run, "edits")
    return sorted(edits[edits.op == "suppress"].fact_id.dropna().unique())[0]


# ---- queries ------------------------------------------------------------------------------------
def test_relations_match_pandas(run, queries):
    prompts, kn = _read(run, "prompts"), _read(run, "knowledge_neurons")
    frame = queries.relations(Listing()).set_index("relation")
    expected = prompts.groupby("relation").agg(facts=("fact_id", "nunique"), prompts=("prompt_id", "size"))
    assert frame.facts.to_dict() == expected.facts.to_dict() and frame.prompts.to_dict() == expected.prompts.to_dict()
    usable = prompts[prompts.status == "ok"].groupby("relation").fact_id.nunique()
    per_fact = kn[kn.method == "ig"].groupby("relation").size() / usable
    np.testing.assert_allclose(frame.kn_per_fact.sort_index(), per_fact.sort_index(), rtol=0, atol=1e-12)
    edits = _read(run, "edits")
    rows = edits[(edits.op == "suppress") & (edits.condition == "kn") & edits.prompt_id.notna()]
    facts = rows.groupby(["relation", "fact_id"]).rel_change.mean().groupby("relation")
    np.testing.assert_allclose(frame.suppress.sort_index(), facts.mean().sort_index(), rtol=0, atol=1e-12)
    half = 1.959964 * facts.std(ddof=1) / np.sqrt(facts.size())
    np.testing.assert_allclose(frame.suppress_ci.sort_index(), half.sort_index(), rtol=0, atol=1e-12)


def test_relations_sort_and_filter(queries):
    by_facts = queries.relations(Listing(sort="facts", desc=True))
    assert list(by_facts.facts) == sorted(by_facts.facts, reverse=True)
    assert list(queries.relations(Listing(q="p19")).relation) == ["P19"]
    assert queries.relations(Listing(q="nothing-like-this")).empty


def test_facts_search_sort_and_pages(run, queries):
    prompts = _read(run, "prompts")
    p19 = prompts[prompts.relation == "P19"]
    first = queries.facts(Listing(sort="gold", desc=True), "P19", size=10)
    assert first.total == p19.fact_id.nunique() and first.pages == -(-first.total // 10)
    gold = first.rows.mean_gold_prob.to_numpy()
    assert (np.diff(gold) <= 0).all()
    seen = set()
    for page in range(1, first.pages + 1):
        seen |= set(queries.facts(Listing(sort="gold", desc=True, page=page), "P19", size=10).rows.fact_id)
    assert seen == set(p19.fact_id)
    subject = p19.subject.iloc[0]
    found = queries.facts(Listing(q=subject.upper()))
    assert set(found.rows.fact_id) == set(prompts[prompts.subject.str.lower().str.contains(subject.lower())].fact_id)


def test_fact_view_counts_coarse_prompts_like_the_aggregation(run, queries):
    coarse, kn = _coarse(run), _read(run, "knowledge_neurons")
    for fact_id in kn[kn.method == "ig"].fact_id.unique()[:5]:
        cells = queries.fact_neurons(fact_id).set_index(["layer", "neuron"])
        expected = coarse[coarse.fact_id == fact_id].groupby(["layer", "neuron"]).size()
        assert cells.coarse_prompts[cells.coarse_prompts > 0].to_dict() == expected.to_dict()
        mine = kn[(kn.fact_id == fact_id) & (kn.method == "ig")].set_index(["layer", "neuron"])
        assert set(cells.index[cells.kn_ig]) == set(mine.index)
        # a knowledge neuron's n_prompts is the aggregation's own count of the same coarse prompts
        assert cells.loc[mine.index, "coarse_prompts"].to_dict() == mine.n_prompts.to_dict()


def test_fact_edits_rows_per_condition(run, queries):
    fact_id = _edited_fact(run)
    edits = _read(run, "edits")
    tables = queries.fact_edits(fact_id)
    assert {"suppress", "amplify", "update"} <= set(tables)
    suppress = tables["suppress"].set_index("measure")
    assert list(suppress.columns) == ["kn", "activation", "random", "other_relation"]
    rows = edits[(edits.op == "suppress") & (edits.fact_id == fact_id) & (edits.condition == "random")]
    assert suppress.loc["prompts", "random"] == len(rows)
    assert suppress.loc["rel_change", "random"] == pytest.approx(rows.rel_change.mean(), abs=1e-12)
    update = tables["update"].set_index("measure")
    metric = edits[(edits.op == "update") & (edits.fact_id == fact_id) & (edits.metric == "success_rate")]
    assert update.loc["success_rate", "kn"] == pytest.approx(metric[metric.condition == "kn"].value.iloc[0])


def test_neuron_reverse_index(run, queries):
    coarse, kn = _coarse(run), _read(run, "knowledge_neurons")
    layer, neuron = kn[kn.method == "ig"].groupby(["layer", "neuron"]).size().idxmax()
    facts = queries.neuron_facts(int(layer), int(neuron)).set_index("fact_id")
    holders = kn[(kn.layer == layer) & (kn.neuron == neuron)]
    assert set(facts.index[facts.kn_ig]) == set(holders[holders.method == "ig"].fact_id)
    expected = coarse[(coarse.layer == layer) & (coarse.neuron == neuron)].groupby("fact_id").size()
    assert facts.coarse_prompts[facts.coarse_prompts > 0].to_dict() == expected.to_dict()
    assert set(facts.index) == set(expected.index) | set(holders.fact_id)
    assert list(facts.relation) == sorted(facts.relation)  # grouped by relation


def _dense_copy(run, out):
    """The same run in the dense layout: every (prompt, layer) row holds all scores, unstored ones 0."""
    config = RunDirectory(run).config.as_dict()
    config["identity"]["keep"]["dense"] = True
    layers, width = config["identity"]["model_info"]["num_layers"], config["identity"]["model_info"]["num_neurons"]
    prompts, neurons = _read(run, "prompts"), _read(run, "neurons")
    ok = prompts[prompts.status == "ok"]
    grid = np.zeros((len(ok), layers, width), np.float32)
    index = pd.Series(np.arange(len(ok)), index=ok.prompt_id)
    mine = neurons[neurons.prompt_id.isin(index.index)]
    grid[index[mine.prompt_id].to_numpy(), mine.layer.to_numpy(), mine.neuron.to_numpy()] = mine.score.to_numpy()
    keys = ok.loc[ok.index.repeat(layers)]
    table = pa.table({"prompt_id": keys.prompt_id.to_numpy(), "fact_id": keys.fact_id.to_numpy(),
                      "relation": keys.relation.to_numpy(), "layer": np.tile(np.arange(layers, dtype=np.int16), len(ok)),
                      "scores": pa.FixedSizeListArray.from_arrays(pa.array(grid.reshape(-1)), width)},
                     schema=dense_schema(width))
    kept = {name: pa.Table.from_pandas(_read(run, name), preserve_index=False)
            for name in ("prompts", "knowledge_neurons", "relation_neurons")}
    write_tables(out, config, **kept, neurons=table)


def test_dense_layout_shows_what_the_sparse_one_shows(run, queries, tmp_path):
    _dense_copy(run, tmp_path)
    dense = RunQueries(RunDirectory(tmp_path))
    kn = _read(run, "knowledge_neurons")
    fact_id = kn.fact_id.iloc[0]
    columns = ["layer", "neuron", "coarse_prompts", "kn_ig", "kn_activation"]
    pd.testing.assert_frame_equal(dense.fact_neurons(fact_id)[columns], queries.fact_neurons(fact_id)[columns])
    layer, neuron = int(kn.layer.iloc[0]), int(kn.neuron.iloc[0])
    columns = ["fact_id", "coarse_prompts", "kn_ig"]
    pd.testing.assert_frame_equal(dense.neuron_facts(layer, neuron)[columns], queries.neuron_facts(layer, neuron)[columns])
    assert dense.neuron_rows() == queries.shape[0] * queries.shape[1] * (_read(run, "prompts").status == "ok").sum()
    dense.close()
    client = TestClient(create_app(str(tmp_path)), raise_server_exceptions=False, base_url=LOCAL)
    assert client.get(fact_url(fact_id)).status_code == 200
    assert client.get(f"/neuron/{layer}/{neuron}").status_code == 200


# ---- pages --------------------------------------------------------------------------------------
def test_every_page_renders_with_links(run, client):
    fact_id = _edited_fact(run)
    kn = _read(run, "knowledge_neurons")
    mine = kn[(kn.fact_id == fact_id) & (kn.method == "ig")]
    overview = client.get("/")
    assert overview.status_code == 200 and "synthetic/bert-base-like" in overview.text
    assert "/figures/layers.svg" in overview.text and "kn-ray aggregate" not in overview.text
    assert client.get("/figures/layers.svg").headers["content-type"].startswith("image/svg+xml")
    assert client.get("/figures/suppress.svg").status_code == 200
    relations = client.get("/relations?sort=kn&desc=1")
    assert relations.status_code == 200 and 'href="/relation/P19"' in relations.text
    relation = client.get("/relation/P19")
    assert relation.status_code == 200 and "/fact/P19%3A" in relation.text
    fact = client.get(fact_url(fact_id))
    assert fact.status_code == 200
    for layer, neuron in zip(mine.layer, mine.neuron):
        assert f'href="/neuron/{layer}/{neuron}"' in fact.text
    data = json.loads(re.search(r'<script type="application/json" id="neuron-map-data">(.*?)</script>', fact.text,
                                re.S)[1])
    marked = {(p["y"], p["x"]) for p in data["points"] if p["kn"]}
    assert marked == set(zip(mine.layer, mine.neuron)) and all(p["url"].startswith("/neuron/") for p in data["points"])
    for asset in ("/static/vendor/chart.umd.min.js", "/static/neuron-map.js"):
        assert asset in fact.text and client.get(asset).status_code == 200
    assert 'id="edit-suppress"' in fact.text and 'id="edit-update"' in fact.text
    layer, neuron = int(mine.layer.iloc[0]), int(mine.neuron.iloc[0])
    page = client.get(f"/neuron/{layer}/{neuron}")
    assert page.status_code == 200 and f'href="{fact_url(fact_id)}"' in page.text
    search = client.get("/search", params={"q": fact_id})
    assert f'href="{fact_url(fact_id)}"' in search.text
    assert 'href="/neuron/3/17"' in client.get("/search", params={"q": "L3 N17"}).text


def test_run_without_aggregate_or_edits_names_the_commands(tmp_path):
    write_synthetic_run(tmp_path, SyntheticSpec(facts=20, relations=2, layers=4, neurons=64, seed=4))
    client = TestClient(create_app(str(tmp_path)), raise_server_exceptions=False, base_url=LOCAL)
    overview = client.get("/")
    assert overview.status_code == 200
    assert f"kn-ray aggregate {tmp_path}" in overview.text and f"kn-ray edit {tmp_path}" in overview.text
    fact_id = _read(tmp_path, "prompts").fact_id.iloc[0]
    for url in ("/relations", "/relation/P17", fact_url(fact_id), "/neuron/1/2"):
        page = client.get(url)
        assert page.status_code == 200 and "kn-ray aggregate" in page.text, url
    assert client.get("/figures/layers.svg").status_code == 404


def test_run_in_progress_shows_committed_shards_only(tmp_path):
    out, spec = tmp_path / "run", SyntheticSpec(facts=10, relations=2, layers=4, neurons=64, facts_per_part=5, seed=5)
    write_synthetic_run(out, spec, committed=0)  # both shards' parts written, neither committed
    client = TestClient(create_app(str(out), refresh=0), raise_server_exceptions=False, base_url=LOCAL)
    empty = client.get("/")
    assert empty.status_code == 503 and "nothing committed yet" in empty.text
    write_synthetic_run(out, spec, committed=1)
    page = client.get("/")
    assert page.status_code == 200 and "1 of 2 shards are committed" in page.text
    run = RunDirectory(out)
    facts = run.read("prompts").to_pandas().fact_id
    assert f'id="facts-count">{facts.nunique()}<' in page.text
    later = pd.read_parquet(out / "prompts").fact_id  # every part, the uncommitted one too
    assert set(later) > set(facts)
    assert client.get(fact_url(sorted(set(later) - set(facts))[0])).status_code == 404  # in an uncommitted part: not shown


@pytest.mark.parametrize("make, title", [
    (lambda p: p / "nowhere", "No such run directory"),
    (lambda p: (p / "stuff.txt").write_text("x") and p, "Not a kn-ray run"),
    (lambda p: (p / "run.json").write_text("{not json") and p, "Not a kn-ray run"),
])
def test_not_a_run_gets_a_clear_page(tmp_path, make, title):
    client = TestClient(create_app(str(make(tmp_path))), raise_server_exceptions=False, base_url=LOCAL)
    for url in ("/", "/relations", "/fact/x", "/neuron/1/2"):
        page = client.get(url)
        assert page.status_code == 404 and title in page.text and "Traceback" not in page.text


def test_cli_refuses_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert cli(["explore", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["explore", str(tmp_path), "--port", "70000"]) == 2


def test_binding_beyond_loopback_is_flagged():
    assert ExploreOptions().loopback and ExploreOptions(host="::1").loopback and ExploreOptions(host="localhost").loopback
    assert not ExploreOptions(host="0.0.0.0").loopback and not ExploreOptions(host="10.1.2.3").loopback


# ---- URL tricks ---------------------------------------------------------------------------------
SECRET = "kn-ray-explore-test-secret"


@pytest.fixture(scope="module")
def guarded(run, tmp_path_factory):
    """A file beside the run that no page may reveal."""
    (run.parent / "secret.txt").write_text(SECRET)
    return TestClient(create_app(str(run)), raise_server_exceptions=False, base_url=LOCAL)


@pytest.mark.parametrize("url", [
    "/static/../../secret.txt", "/static/..%2F..%2F..%2Fsecret.txt", "/static/%2e%2e/%2e%2e/app.py",
    "/fact/../../secret.txt", "/fact/..%2F..%2Fsecret.txt", "/relation/..%2Frun.json", "/figures/..%2Fsecret.svg",
    "/neuron/..%2F..%2Fsecret.txt/1",
])
def test_path_tricks_reveal_nothing(guarded, url):
    page = guarded.get(url)
    assert page.status_code == 404 and SECRET not in page.text and "import " not in page.text


@pytest.mark.parametrize("url", [
    "/fact/x' OR '1'='1", "/fact/P17:0000001'; DROP TABLE prompts; --",
    "/relation/P17' UNION SELECT * FROM read_text('/etc/passwd') --",
    "/fact/\" OR 1=1 --", "/neuron/1 OR 1=1/2", "/neuron/1;SELECT 1/2", "/neuron/-1/2", "/neuron/99999999999/1",
])
def test_sql_in_paths_is_data(guarded, url):
    page = guarded.get(url)
    assert page.status_code == 404 and "root:" not in page.text and "Traceback" not in page.text


def test_sql_in_parameters_is_data(run, guarded):
    everything = _read(run, "prompts").fact_id.nunique()
    for q in ("' OR 1=1 --", "%", "_", "') UNION SELECT * FROM read_text('/etc/passwd') --"):
        page = guarded.get("/search", params={"q": q})
        assert page.status_code == 200 and "No fact matches." in page.text and "root:" not in page.text
    for sort in ("relation; DROP TABLE x", "facts DESC, (SELECT 1)", "1"):
        page = guarded.get("/relations", params={"sort": sort, "desc": "1"})
        assert page.status_code == 200 and page.text.count('href="/relation/') == 3
    for page_number in ("-1", "0", "abc", "99999999999999", "1e9"):
        page = guarded.get("/relation/P17", params={"page": page_number})
        assert page.status_code == 200
    assert everything > 0


def test_a_failing_page_shows_no_traceback(run, monkeypatch):
    client = TestClient(create_app(str(run)), raise_server_exceptions=False, base_url=LOCAL)

    def broken(self, listing):
        raise RuntimeError("the disk went away")

    monkeypatch.setattr(RunQueries, "relations", broken)
    page = client.get("/relations")
    assert page.status_code == 500 and "the disk went away" in page.text and "Traceback" not in page.text


# ---- a run on S3 ---------------------------------------------------------------------------------
def test_a_run_on_s3_shows_what_the_local_copy_shows(run, queries, s3_server):
    import pyarrow.fs as pafs

    from kn_ray.pipeline.uris import filesystem

    uri = f"s3://{BUCKET}/explore-run"
    fs, path = filesystem(uri)
    pafs.copy_files(str(run), path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    remote = RunQueries(RunDirectory(uri))
    kn = _read(run, "knowledge_neurons")
    fact_id, layer, neuron = kn.fact_id.iloc[0], int(kn.layer.iloc[0]), int(kn.neuron.iloc[0])
    pd.testing.assert_frame_equal(remote.fact_neurons(fact_id), queries.fact_neurons(fact_id))
    pd.testing.assert_frame_equal(remote.neuron_facts(layer, neuron), queries.neuron_facts(layer, neuron))
    pd.testing.assert_frame_equal(remote.relations(Listing()), queries.relations(Listing()))
    remote.close()
    client = TestClient(create_app(uri), raise_server_exceptions=False, base_url=LOCAL)
    page = client.get(fact_url(fact_id))
    assert page.status_code == 200 and f'href="/neuron/{layer}/{neuron}"' in page.text
    assert uri in client.get("/").text


def test_pages_requested_at_once_all_answer(run):
    """A browser loads a page's figures in parallel: every one answers (one DuckDB connection)."""
    from concurrent.futures import ThreadPoolExecutor

    client = TestClient(create_app(str(run)), raise_server_exceptions=False, base_url=LOCAL)
    urls = ["/figures/layers.svg", "/figures/suppress.svg", "/figures/amplify.svg", "/relations", "/"] * 2
    with ThreadPoolExecutor(len(urls)) as pool:
        codes = list(pool.map(lambda url: client.get(url).status_code, urls))
    assert codes == [200] * len(urls)


def test_cli_prints_the_url_and_warns_beyond_loopback(run, monkeypatch, capsys):
    import socket

    import uvicorn

    from kn_ray.interfaces.commands import explore

    served = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self, sockets=None: served.append(sockets))
    real_bind = explore.bind
    monkeypatch.setattr(explore, "bind", lambda options: real_bind(type(options)(host="127.0.0.1")))  # never 0.0.0.0
    assert cli(["explore", str(run), "--host", "0.0.0.0"]) == 0
    out, err = capsys.readouterr()
    port = served[0][0].getsockname()[1]
    assert f"http://127.0.0.1:{port}/" in out and "warning: binding 0.0.0.0" in err
    served[0][0].close()
    assert cli(["explore", str(run)]) == 0
    out, err = capsys.readouterr()
    assert "http://127.0.0.1:" in out and not err
    served[1][0].close()
    assert isinstance(served[1][0], socket.socket)


def test_text_from_the_run_is_escaped(tmp_path):
    write_synthetic_run(tmp_path / "source", SyntheticSpec(facts=6, relations=1, layers=4, neurons=64, seed=6))
    source = RunDirectory(tmp_path / "source")
    prompts = source.read("prompts")
    fact_id = prompts["fact_id"][0].as_py()
    subject = pa.array(["<script>alert('kn')</script>" if f == fact_id else s for f, s
                        in zip(prompts["fact_id"].to_pylist(), prompts["subject"].to_pylist())])
    prompts = prompts.set_column(prompts.schema.get_field_index("subject"), "subject", subject)
    out = write_tables(tmp_path / "run", source.config.as_dict(), prompts=prompts, neurons=source.read("neurons"),
                       activations=source.read("activations"))
    client = TestClient(create_app(str(out)), raise_server_exceptions=False, base_url=LOCAL)
    for page in (client.get(fact_url(fact_id)), client.get("/search", params={"q": "script"})):
        assert page.status_code == 200 and "&lt;script&gt;alert(" in page.text and "<script>alert(" not in page.text


def test_destructive_edits_and_too_few_units_are_shown_as_such(tmp_path):
    """A run of 4 edited facts (fewer than 5 per relation: no interval) and three update edits, one
    of which multiplies other facts' perplexity by 100 (destructive at the default bound)."""
    from kn_ray.pipeline.layout import part_file
    from kn_ray.stages.edit.criteria import criteria_summary
    from kn_ray.stages.edit.outcomes import as_table, edit_metric_rows
    from tests.test_edit_predictions import update_edit

    out = write_explorable_run(tmp_path / "run", facts=30, edited_facts=4, seed=2)
    update = pd.DataFrame(update_edit("broken", 100.0) + update_edit("clean", 2.0) + update_edit("edge", 10.0))
    metrics = edit_metric_rows(update, 10.0)
    edits = pd.concat([_read(out, "edits"), update, metrics], ignore_index=True)
    run = RunDirectory(out)
    with run.staged("edits") as staging:
        pq.write_table(as_table(edits), staging / part_file(0))
    criteria = criteria_summary(metrics).drop(columns="too_few")  # as an edits.json from before `too_few`
    run.write_summary("edit", {"runs": {"update": {"settings": {"destructive_ppl_ratio": 10.0}}},
                               "criteria": criteria.astype(object).where(criteria.notna(), None).to_dict("records")})
    client = TestClient(create_app(str(out), refresh=0), raise_server_exceptions=False, base_url=LOCAL)
    overview = client.get("/").text
    table = re.search(r'<table id="destructive">(.*?)</table>', overview, re.S)[1]
    assert re.search(r"<td class=\"l\">update</td><td class=\"l\">kn</td><td>3</td><td>1</td><td>0.333</td>"
                     r"<td>&times;10</td>", table), table
    criteria_table = re.search(r'<table id="criteria">(.*?)</table>', overview, re.S)[1]
    assert "n=3, too few for an interval" in criteria_table and "[" not in criteria_table
    assert "flip rate" in overview
    relations = client.get("/relations").text
    assert "too few for an interval" in relations  # 4 edited facts over 3 relations


# ---- what the model knows, levels, consistency ----------------------------------------------------
@pytest.fixture(scope="module")
def probed(tmp_path_factory):
    """A probed run whose unknown prompts were attributed (status 'ok', known false)."""
    return write_explorable_run(tmp_path_factory.mktemp("probed") / "run", facts=60, edited_facts=20, seed=5,
                                known_share=0.7, attribute_unknown=True)


def test_known_shares_per_relation_and_usable_prompts_by_the_aggregation_rule(probed):
    prompts = _read(probed, "prompts")
    client = TestClient(create_app(str(probed), refresh=0), raise_server_exceptions=False, base_url=LOCAL)
    q = RunQueries(RunDirectory(probed))
    try:
        frame = q.relations(Listing()).set_index("relation")
    finally:
        q.close()
    probed_rows = prompts[prompts.known.notna()]
    share = probed_rows.known.astype(bool).groupby(probed_rows.relation).mean()
    np.testing.assert_allclose(frame.known_share.sort_index(), share.sort_index(), rtol=0, atol=1e-12)
    usable = prompts[(prompts.status == "ok") & prompts.known.fillna(True).astype(bool)]
    assert frame.usable.sort_index().tolist() == usable.groupby("relation").size().sort_index().tolist()
    assert (frame.usable < frame.ok).any()  # the attributed unknown prompts are not usable
    page = client.get("/relations").text
    for relation, value in share.items():
        known = int(probed_rows[probed_rows.relation == relation].known.astype(bool).sum())
        assert f"{100 * value:.1f}% <span class=\"muted small\">({known} / " in page
    overview = client.get("/").text
    assert f"<b>{int(probed_rows.known.astype(bool).sum())}</b><span>known of {len(probed_rows)} probed" in overview


def test_fact_page_shows_known_prompts_consistency_and_edits_before_neurons(probed):
    consistency = _read(probed, "fact_consistency")
    edits = _read(probed, "edits")
    prompts = _read(probed, "prompts")
    unknown = set(prompts[prompts.known.eq(False) & prompts.status.eq("ok")].fact_id)
    fact_id = sorted(set(edits[edits.op == "suppress"].fact_id.dropna()) & set(consistency.fact_id) & unknown)[0]
    row = consistency[(consistency.fact_id == fact_id) & (consistency.method == "ig")].iloc[0]
    client = TestClient(create_app(str(probed), refresh=0), raise_server_exceptions=False, base_url=LOCAL)
    page = client.get(fact_url(fact_id)).text
    assert f"of its {row.n_prompts} usable prompts ({row.n_pairs} pairs" in page
    assert re.search(rf"Consistency: <b>{row.jaccard:.3g}", page)
    assert page.index("<h2>Edit outcomes</h2>") < page.index('<table id="neurons">')
    mine = prompts[prompts.fact_id == fact_id].sort_values("prompt_id")
    cells = re.findall(r'<td class="known">([^<]*)</td><td>([^<]*)</td>', page)
    assert cells == [("yes" if k else "no", str(int(r))) for k, r in zip(mine.known, mine.gold_rank)]
    usable = int((mine.status.eq("ok") & mine.known).sum())
    assert f"{usable} usable of {len(mine)} prompts; the model knows {int(mine.known.sum())} of the {len(mine)} probed" \
        in page


def test_neuron_page_shows_the_level(probed):
    shared = _read(probed, "shared_neurons")
    generic = shared[shared.level == "generic"].sort_values(["n_facts", "layer", "neuron"], ascending=[False, True, True])
    top = generic.iloc[0]
    client = TestClient(create_app(str(probed), refresh=0), raise_server_exceptions=False, base_url=LOCAL)
    page = client.get(f"/neuron/{top.layer}/{top.neuron}").text
    assert re.search(rf'<span class="tag[^"]*">generic</span> knowledge neuron of {top.n_facts} facts in '
                     rf'{top.n_relations} relations', page)
    facts = _read(probed, "shared_neuron_facts")
    mine = facts[(facts.layer == top.layer) & (facts.neuron == top.neuron) & (facts.method == top.method)]
    assert len(mine) == top.n_facts  # its facts are listed as the knowledge neuron's, though not in knowledge_neurons
    kn = _read(probed, "knowledge_neurons")
    fact_level = kn[kn.method == "ig"].iloc[0]
    page = client.get(f"/neuron/{fact_level.layer}/{fact_level.neuron}").text
    assert '<span class="tag">fact</span> knowledge neuron of its fact alone' in page


# ---- strict numbers, hosts, headers, long URLs, caching, concurrency ---------------------------------
@pytest.mark.parametrize("url", ["/neuron/%C2%B2/1", "/neuron/1/%C2%B2", "/neuron/%D9%A3/1", "/neuron/%EF%BC%91/1",
                                 "/neuron/+1/1", "/neuron/%201/1", "/neuron/1_0/1"])
def test_neuron_numbers_are_ascii_digits_only(client, url):
    """A superscript two passes str.isdigit() and fails int(); an Arabic-Indic three passes both."""
    page = client.get(url)
    assert page.status_code == 404 and "Unknown neuron" in page.text and "Traceback" not in page.text


def test_page_numbers_and_searched_neurons_are_ascii_digits_only(client):
    assert client.get("/relation/P17", params={"page": "\u00b2"}).status_code == 200
    assert client.get("/relations", params={"page": "\u0663"}).status_code == 200
    page = client.get("/search", params={"q": "L\u0663 N1"})
    assert page.status_code == 200 and 'href="/neuron/' not in page.text
    assert 'href="/neuron/3/1"' in client.get("/search", params={"q": "L3 N1"}).text


def test_only_loopback_hosts_are_answered(run):
    app = create_app(str(run))
    for base in ("http://127.0.0.1:8765", "http://localhost:8765", "http://[::1]:8765", "http://127.0.0.2"):
        assert TestClient(app, base_url=base).get("/").status_code == 200, base
    for host in ("evil.example", "evil.example:8765", "127.0.0.1.evil.example", "localhost.evil.example", "",
                 "10.1.2.3:8765"):
        page = TestClient(app, base_url=LOCAL).get("/", headers={"host": host})
        assert page.status_code == 400 and "Unknown host" in page.text and "facts" not in page.text, host
    bound = create_app(str(run), host="10.1.2.3")  # `--host 10.1.2.3`: that name too
    assert TestClient(bound, base_url="http://10.1.2.3:8765").get("/").status_code == 200
    assert TestClient(bound, base_url=LOCAL).get("/", headers={"host": "evil.example"}).status_code == 400


def test_every_response_forbids_framing_and_foreign_content(client):
    for url in ("/", "/relations", "/nothing-here", "/static/style.css", "/figures/layers.svg"):
        page = client.get(url)
        csp = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "default-src 'none'" in csp, url
        assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert "script-src 'self'" in client.get("/").headers["content-security-policy"]
    assert "unsafe" not in client.get("/").headers["content-security-policy"]
    assert 'style="' not in client.get(fact_url(_edited_fact_id(client))).text  # no inline style for the CSP to block


def _edited_fact_id(client) -> str:
    return re.search(r'href="/fact/([^"]+)"', client.get("/search", params={"q": "P"}).text)[1]


def test_links_do_not_echo_a_long_query(client):
    q = "x" * 8000
    page = client.get("/search", params={"q": q, "sort": "gold"})
    assert page.status_code == 200 and len(page.text) < 40_000 and "x" * 201 not in page.text
    page = client.get("/relations", params={"q": q[:4000], "junk": q[:4000]})
    assert page.status_code == 200 and "x" * 201 not in page.text and "junk" not in page.text
    page = client.get("/search", params={"q": "y" * 60_000})  # httpx allows 64 KB; 200 KB: next test
    assert page.status_code == 414 and len(page.text) < 1000


def test_a_served_run_answers_a_200_kb_url_with_414(run):
    """Through uvicorn (h11): a long request line is read and answered, not reset."""
    import http.client
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {"PYTHONPATH": str(root), **{k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}}
    process = subprocess.Popen([sys.executable, "-m", "kn_ray.interfaces.cli", "explore", str(run)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        url = next(line.strip() for line in iter(process.stdout.readline, "") if line.startswith("http://"))
        host, port = url[len("http://"):].rstrip("/").rsplit(":", 1)
        for size, status in ((200_000, 414), (100, 200)):
            connection = http.client.HTTPConnection(host, int(port), timeout=30)
            connection.request("GET", "/search?q=" + "z" * size)
            response = connection.getresponse()
            assert response.status == status and b"z" * 201 not in response.read()
            connection.close()
        connection = http.client.HTTPConnection(host, int(port), timeout=30)
        connection.request("GET", "/", headers={"Host": "evil.example"})
        assert connection.getresponse().status == 400
        connection.close()
    finally:
        process.terminate()
        process.wait(timeout=30)


def test_overview_names_the_attribution_rule(client):
    page = client.get("/")
    assert re.search(r'<dd id="attribution">rule left, 20 steps', page.text), page.text[:3000]


def test_figures_and_overview_are_computed_once_per_snapshot(run, monkeypatch):
    from kn_ray.stages.report import figures

    drawn, stats = [], []
    real_svg, real_stats = figures.svg, RunQueries.run_stats
    monkeypatch.setattr(figures, "svg", lambda figure: drawn.append(1) or real_svg(figure))
    monkeypatch.setattr(RunQueries, "run_stats", lambda self: stats.append(1) or real_stats(self))
    client = TestClient(create_app(str(run), refresh=3600), base_url=LOCAL)
    for _ in range(3):
        assert client.get("/").status_code == 200
        assert client.get("/figures/layers.svg").status_code == 200
        assert client.get("/figures/suppress.svg").status_code == 200
    assert len(drawn) == 2 and len(stats) == 2  # two figures; run_stats for the overview and the captions


def test_pages_are_served_concurrently(run, monkeypatch):
    """Two slow pages at once: each waits for the other inside its query, which only passes if
    they are not served one at a time."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    meeting = threading.Barrier(2, timeout=20)
    real = RunQueries.relations

    def meet(self, listing):
        meeting.wait()
        return real(self, listing)

    monkeypatch.setattr(RunQueries, "relations", meet)
    client = TestClient(create_app(str(run), refresh=3600), raise_server_exceptions=False, base_url=LOCAL)
    with ThreadPoolExecutor(2) as pool:
        codes = list(pool.map(lambda url: client.get(url).status_code, ["/relations", "/relations?sort=kn"]))
    assert codes == [200, 200]


def test_a_replaced_snapshot_is_closed_after_its_last_page(run):
    from kn_ray.stages.explore.app import Explorer

    explorer = Explorer(str(run), refresh=3600)
    with explorer.lease() as (_, first):
        explorer._open(("changed",))  # a new snapshot while a page reads the old one
        assert first.df("SELECT 1 AS x").x.iloc[0] == 1  # still open
        assert explorer.queries is not first
    with pytest.raises(Exception):
        first.df("SELECT 1")
    explorer.queries.close()
