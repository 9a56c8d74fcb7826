"""kn-ray explore in a real browser: the system's headless Chromium (Debian's chromium and
chromium-driver, which `make test` installs where it can), driven by Selenium with no download.

The flow: overview -> search a fact -> open it -> follow one of its knowledge neurons -> back
to the fact from the neuron's page -> its relation. Each page is checked for the rows and
numbers the run holds and for console errors; the last page's screenshot is saved as a test
artifact (pytest's tmp dir, or $KN_RAY_ARTIFACTS). `KN_RAY_EXPLORE_RUN=out/demo` runs the same
flow on a real run instead of the synthetic one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.explore.app import fact_url
from tests.synthetic import write_explorable_run

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync",
         "--window-size=1300,1600"]
ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                                reason="no system Chromium (/usr/bin/chromium and /usr/bin/chromedriver; "
                                       "`apt-get install chromium chromium-driver`, which `make test` runs as root)")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    given = os.environ.get("KN_RAY_EXPLORE_RUN")
    if given:
        return Path(given)
    return write_explorable_run(tmp_path_factory.mktemp("browser") / "run", facts=60, edited_facts=20, seed=7)


@pytest.fixture(scope="module")
def server(run_dir):
    """`kn-ray explore RUN` in a subprocess: the URL it prints, stopped by its PID afterwards."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    process = subprocess.Popen([sys.executable, "-m", "kn_ray.interfaces.cli", "explore", str(run_dir)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = [process.stdout.readline() for _ in range(2)]
        url = next((line.strip() for line in lines if line.startswith("http://127.0.0.1:")), None)
        assert url, f"no URL printed: {lines}"
        yield url
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must not download anything
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + [f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(60)
    try:
        yield driver
    finally:
        driver.quit()


def _no_console_errors(driver) -> None:
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def _table(run: RunDirectory, table: str) -> pd.DataFrame:
    files = run.parts(table)
    return pd.concat([pq.read_table(f, filesystem=run.fs).to_pandas() for f in files]) if files else pd.DataFrame()


def _known_fact(run_dir: Path) -> tuple[dict, list[tuple[int, int]]]:
    """A fact with ig knowledge neurons (an edited one if any): its prompt rows and neurons."""
    run = RunDirectory(run_dir)
    prompts = run.read("prompts").to_pandas()
    neurons = _table(run, "knowledge_neurons")
    neurons = neurons[neurons.method == "ig"]
    edits = _table(run, "edits")
    edited = set(edits.fact_id.dropna()) if len(edits) else set()
    fact_id = sorted(set(neurons.fact_id), key=lambda f: (f not in edited, f))[0]
    mine = prompts[prompts.fact_id == fact_id]
    cells = sorted(zip(neurons[neurons.fact_id == fact_id].layer, neurons[neurons.fact_id == fact_id].neuron))
    return ({"fact_id": fact_id, "subject": mine.subject.iloc[0], "relation": mine.relation.iloc[0], "prompts": mine,
             "facts": prompts.fact_id.nunique()}, [(int(layer), int(neuron)) for layer, neuron in cells])


def test_fact_neuron_fact_loop_in_chromium(server, browser, run_dir, tmp_path):
    from selenium.webdriver.common.by import By

    fact, cells = _known_fact(run_dir)
    browser.get(server)
    assert "kn-ray explore" in browser.title
    assert browser.find_element(By.ID, "facts-count").text.replace(",", "") == str(fact["facts"])
    assert browser.find_element(By.ID, "attribution").text.startswith("rule ")  # run.json's attribution.rule
    assert all(image.get_property("naturalWidth") > 0 for image in browser.find_elements(By.CSS_SELECTOR, "figure img"))
    _no_console_errors(browser)  # the Content-Security-Policy blocks nothing of the app's own

    box = browser.find_element(By.ID, "search")
    box.send_keys(fact["fact_id"])
    box.submit()
    results = browser.find_element(By.ID, "results")
    results.find_element(By.LINK_TEXT, fact["fact_id"]).click()
    _no_console_errors(browser)

    assert fact["subject"] in browser.find_element(By.TAG_NAME, "h1").text
    rows = browser.find_elements(By.CSS_SELECTOR, "#prompts tr")[1:]
    assert len(rows) == len(fact["prompts"])
    golds = {f"{p:.3g}" for p in fact["prompts"].gold_prob.dropna()}
    assert golds <= {cell.text for cell in browser.find_elements(By.CSS_SELECTOR, "#prompts td.gold")}
    drawn = browser.execute_script("const c = Chart.getChart('neuron-map-canvas');"
                                   "return c ? c.data.datasets[0].data.map(p => [p.y, p.x]) : null;")
    assert sorted(map(tuple, drawn)) == cells  # the map rings exactly the fact's knowledge neurons
    layer, neuron = cells[0]
    browser.find_element(By.CSS_SELECTOR, f"#neurons a[href='/neuron/{layer}/{neuron}']").click()
    _no_console_errors(browser)

    assert browser.find_element(By.TAG_NAME, "h1").text == f"Neuron L{layer} N{neuron}"
    fact_link = browser.find_element(By.CSS_SELECTOR, f"#neuron-facts a[href='{fact_url(fact['fact_id'])}']")
    row = fact_link.find_element(By.XPATH, "./ancestor::tr")
    assert "yes" in row.text  # a knowledge neuron of that fact
    fact_link.click()
    _no_console_errors(browser)

    assert fact["subject"] in browser.find_element(By.TAG_NAME, "h1").text
    browser.find_element(By.ID, "relation-link").click()
    _no_console_errors(browser)
    assert browser.find_element(By.TAG_NAME, "h1").text == f"Relation {fact['relation']}"
    assert browser.find_elements(By.CSS_SELECTOR, "#facts tr")[1:]
    shot = Path(os.environ.get("KN_RAY_ARTIFACTS", tmp_path)) / "explore-relation.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    assert browser.save_screenshot(str(shot)) and shot.stat().st_size > 1000


def test_hostile_urls_get_plain_answers_in_chromium(server, browser):
    from selenium.webdriver.common.by import By

    for path in ("neuron/%C2%B2/1", "neuron/%D9%A3/1"):  # a superscript two, an Arabic-Indic three
        browser.get(server + path)
        assert browser.find_element(By.TAG_NAME, "h1").text == "Unknown neuron"
    browser.get(server + "search?q=" + "x" * 5000)
    assert browser.find_element(By.ID, "search").get_property("value") == "x" * 200
    links = [a.get_attribute("href") for a in browser.find_elements(By.TAG_NAME, "a")]
    assert links and max(map(len, links)) < 600  # sort links carry the query as searched, not as sent
    browser.get(server + "search?q=" + "x" * 200_000)
    assert "URL too long" in browser.find_element(By.TAG_NAME, "body").text


def test_overview_loads_quickly_in_chromium(server, browser):
    """The overview with its figures: drawn once per snapshot, so a reload is quick (about 0.1 s on
    2 idle cores; bounded loosely here for shared machines). BENCHMARKS.md has the measurement."""
    browser.get(server)
    loads = []
    for _ in range(3):
        browser.refresh()
        loads.append(browser.execute_script(
            "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;"))
    assert min(loads) < 2000, loads
