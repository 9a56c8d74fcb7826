"""Page latency of `kn-ray explore` on a run directory, measured in this process through
Starlette's TestClient (the app's whole work per request: DuckDB queries, figures, templates;
no network).

    python -m tests.synthetic OUT --neuron-rows 10000000 --relations 20 --edits   # from the repo root
    kn-ray aggregate OUT
    python benchmarks/explore_latency.py OUT [--repeats 5]

Per page: the first request after the app opened the run (`cold`: includes listing the parts
and DuckDB reading the Parquet footers), then the median and max of `--repeats` further ones,
and the median CPU time of the process per request (all threads: what the page costs whatever
else shares the machine).
Prints a Markdown table and the run's size.

    python benchmarks/explore_latency.py OUT --browser [--repeats 10]

`--browser`: the overview's load time in the system's headless Chromium (what a user waits
for: the page, its stylesheet and its figures, over HTTP from `kn-ray explore OUT` in a
subprocess): the first load after the server started, then the median and max of `--repeats`
reloads (`performance` navigation timing, start to the load event).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from starlette.testclient import TestClient  # noqa: E402

from kn_ray.pipeline.rundir import RunDirectory  # noqa: E402
from kn_ray.stages.explore.app import create_app, fact_url, neuron_url, relation_url  # noqa: E402
from kn_ray.stages.explore.queries import RunQueries  # noqa: E402


def pages(out: str) -> list[tuple[str, str]]:
    """(label, URL): an edited fact with knowledge neurons, its most shared neuron, its relation."""
    q = RunQueries(RunDirectory(out))
    try:
        row = q.df(f"""SELECT k.fact_id, k.relation, k.layer, k.neuron FROM {q.src('knowledge_neurons')} k
                       WHERE k.method = 'ig' AND k.fact_id IN (SELECT fact_id FROM {q.src('edits')} WHERE fact_id IS NOT NULL)
                       ORDER BY k.fact_id LIMIT 1""").iloc[0] if q.has("edits") else \
            q.df(f"SELECT fact_id, relation, layer, neuron FROM {q.src('knowledge_neurons')} LIMIT 1").iloc[0]
        shared = q.df(f"""SELECT layer, neuron FROM {q.src('knowledge_neurons')} WHERE method = 'ig'
                          GROUP BY ALL ORDER BY count(*) DESC LIMIT 1""").iloc[0]
        rows = q.neuron_rows()
    finally:
        q.close()
    print(f"run: {out}, {rows:,} neuron rows", file=sys.stderr)
    return [("overview (first page)", "/"), ("relations", "/relations?sort=kn&desc=1"),
            ("relation page", relation_url(row.relation)), ("fact page", fact_url(row.fact_id)),
            ("neuron page (its knowledge neuron)", neuron_url(row.layer, row.neuron)),
            ("neuron page (most shared neuron)", neuron_url(shared.layer, shared.neuron)),
            ("search", f"/search?q={row.fact_id}"), ("figure: layers", "/figures/layers.svg")]


def measure(out: str, repeats: int) -> list[dict]:
    targets = pages(out)
    client = TestClient(create_app(out, refresh=3600), base_url="http://127.0.0.1")
    results = []
    for label, url in targets:
        times, cpu = [], []
        for _ in range(repeats + 1):
            started, used = time.perf_counter(), time.process_time()
            response = client.get(url)
            times.append(time.perf_counter() - started)
            cpu.append(time.process_time() - used)
            assert response.status_code == 200, (url, response.status_code)
        results.append(dict(page=label, url=url, cold=times[0], median=statistics.median(times[1:]),
                            max=max(times[1:]), cpu=statistics.median(cpu[1:]), bytes=len(response.content)))
    return results


def browser_loads(out: str, repeats: int) -> list[float]:
    """Seconds from navigation start to the load event of the overview, first load then reloads."""
    import subprocess

    from tests.test_explore_browser import CHROMEDRIVER, CHROMIUM, FLAGS

    os.environ["SE_OFFLINE"] = "true"
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "kn_ray.interfaces.cli", "explore", out],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in FLAGS + ["--disk-cache-size=1"]:
        options.add_argument(flag)
    driver = None
    try:
        lines = [server.stdout.readline() for _ in range(2)]
        url = next(line.strip() for line in lines if line.startswith("http://"))
        driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
        times = []
        for _ in range(repeats + 1):
            driver.get(url)
            times.append(driver.execute_script(
                "const n = performance.getEntriesByType('navigation')[0]; return n.loadEventEnd - n.startTime;") / 1e3)
        return times
    finally:
        if driver is not None:
            driver.quit()
        server.terminate()
        server.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--browser", action="store_true", help="the overview's load time in headless Chromium")
    args = parser.parse_args()
    if args.browser:
        times = browser_loads(args.out, args.repeats)
        print(f"overview in Chromium: first load {times[0]:.3f} s, median of {args.repeats} reloads "
              f"{statistics.median(times[1:]):.3f} s, max {max(times[1:]):.3f} s; load average {os.getloadavg()[0]:.1f}")
        return 0
    results = measure(args.out, args.repeats)
    print(f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} logical CPUs; load average "
          f"{os.getloadavg()[0]:.1f}")
    print("| page | first request (s) | median of next (s) | max (s) | CPU s (median, all threads) | bytes |\n"
          "|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['page']} | {r['cold']:.3f} | {r['median']:.3f} | {r['max']:.3f} | {r['cpu']:.3f} | {r['bytes']:,} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
