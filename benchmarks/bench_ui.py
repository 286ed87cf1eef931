"""Dashboard responsiveness, measured in a real browser (headless Chromium via Playwright).

    .venv/bin/python benchmarks/bench_ui.py                  # reference model, 3 rounds
    .venv/bin/python benchmarks/bench_ui.py --model /tmp/ref_small --rounds 1   # quick, any model folder

Two figures (goals from issue 7, on 2 cores: <= 5 s and <= 1 s):

- **server start -> first page interactive**: from launching ``streamlit run app.py`` to the Model
  page's title, sidebar picker and architecture table rendered with no script still running;
- **page switch with cached results**: clicking a page in the sidebar (client-side switch, same
  session) until that page has finished rendering, after every page has been visited once so its
  results (model, importance, what-if, token scores) are cached.

Writes ``benchmarks/results/ui.csv`` and ``benchmarks/results/ui.md`` and prints a summary.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_e2e_browser import (BUSY, CHROMIUM, CHROMIUM_ARGS, free_port, stop_server)  # noqa: E402

PAGES = ["Budget & what-if", "Importance", "Token maps", "Compress", "Results", "Compare", "Export", "Model"]
RESULTS = ROOT / "benchmarks" / "results"


def wait_rendered(page, title: str, timeout_s: float = 600) -> float:
    """Seconds until the page titled ``title`` shows with nothing running (polled every 20 ms)."""
    start = time.perf_counter()
    deadline = start + timeout_s
    heading = page.locator("[data-testid=stMain] h1").filter(has_text=title)
    while time.perf_counter() < deadline:
        if heading.count() and not page.evaluate(BUSY):
            return time.perf_counter() - start
        time.sleep(0.02)
    raise TimeoutError(f"page {title!r} did not finish within {timeout_s} s")


def one_round(browser, model: str, cache: Path) -> dict[str, float]:
    port = free_port()
    env = dict(os.environ, COMPRESSION_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--browser.gatherUsageStats", "false"], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(600_000)
        while True:  # the browser retries until the server listens, as a user reloading would
            try:
                page.goto(f"http://localhost:{port}/?model={model}", wait_until="commit")
                break
            except Exception:  # noqa: BLE001 - connection refused while the server starts
                time.sleep(0.05)
        page.locator("[data-testid=stSidebar] [role=radiogroup]").wait_for()
        page.locator("[data-testid=stDataFrame]").first.wait_for()
        wait_rendered(page, "Model")
        timings = {"server start -> first page interactive": time.perf_counter() - start}
        # visit every page once so its results are cached, then time the switches
        for title in PAGES:
            page.locator("[data-testid=stSidebar] [data-testid=stPageLink-NavLink]").filter(has=page.get_by_text(title, exact=True)).click()
            wait_rendered(page, title)
            time.sleep(0.3)
        for title in PAGES:
            page.locator("[data-testid=stSidebar] [data-testid=stPageLink-NavLink]").filter(has=page.get_by_text(title, exact=True)).click()
            timings[f"switch to {title}"] = wait_rendered(page, title)
            time.sleep(0.3)
        page.close()
        return timings
    finally:
        stop_server(server)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="reference", help="model source chosen in the sidebar")
    parser.add_argument("--rounds", type=int, default=3, help="server starts (each a fresh store)")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    rows = []
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for r in range(args.rounds):
            # a fresh store each round except that results computed in round 1 stay cached on disk,
            # as they do for a user who restarts the server
            timings = one_round(browser, args.model, Path(tmp) / "cache")
            rows += [{"round": r, "measure": k, "seconds": round(v, 3)} for k, v in timings.items()]
            print(f"round {r}: start {timings['server start -> first page interactive']:.2f} s, switches "
                  + ", ".join(f"{k.removeprefix('switch to ')} {v:.2f}" for k, v in timings.items() if k.startswith("switch")))
        browser.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with open(RESULTS / "ui.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "measure", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    starts = [r["seconds"] for r in rows if r["measure"].startswith("server")]
    switches = [r["seconds"] for r in rows if r["measure"].startswith("switch")]
    load = os.getloadavg()
    summary = [
        "# Dashboard responsiveness (measured in headless Chromium)", "",
        f"Command: `.venv/bin/python benchmarks/bench_ui.py --model {args.model} --rounds {args.rounds}`; "
        f"{os.cpu_count()} CPU cores, load average at the end {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}.", "",
        "| measure | median (s) | max (s) | goal (s) |", "| --- | --- | --- | --- |",
        f"| server start -> first page interactive | {statistics.median(starts):.2f} | {max(starts):.2f} | 5 |",
        f"| page switch, cached results (all pages) | {statistics.median(switches):.2f} | {max(switches):.2f} | 1 |",
        "", "Per page (median over rounds):", "", "| page | switch (s) |", "| --- | --- |"]
    for title in PAGES:
        values = [r["seconds"] for r in rows if r["measure"] == f"switch to {title}"]
        summary.append(f"| {title} | {statistics.median(values):.2f} |")
    (RESULTS / "ui.md").write_text("\n".join(summary) + "\n")
    print("\n".join(summary))


if __name__ == "__main__":
    main()
