"""Dashboard responsiveness, measured in a real browser (headless Chromium via Playwright).

    .venv/bin/python benchmarks/bench_ui.py                  # reference model, 3 rounds
    .venv/bin/python benchmarks/bench_ui.py --model /tmp/ref_small --rounds 1   # quick, any model folder
    .venv/bin/python benchmarks/bench_ui.py --rounds 7 --switch-rounds 3   # more first paints, fewer switches
    .venv/bin/python benchmarks/bench_ui.py --rounds 1 --screenshots test-artifacts/bench_ui

Each round starts ``streamlit run app.py`` afresh, waits for ``/_stcore/health``, then opens the
Model page. Figures (goals from issue 12, on 2 cores: first paint <= 3 s, switch <= 1 s):

- **healthy -> first paint**: from the server answering its health check to the Model page's title,
  sidebar picker and page links drawn: the page is usable (pick a model, switch page) while
  torch, transformers and the model load behind a spinner;
- **empty Streamlit page, healthy -> title**: the same for a page that draws only ``st.title``,
  started just before each round, so a figure on a shared machine can be read against its floor;
- **healthy -> Model page complete**: until its architecture table is drawn and no script, spinner
  or stale element is left (for the record: this includes importing torch and loading the model);
- **page switch with cached results**: clicking a page in the sidebar (client-side switch, same
  session) until that page has finished rendering, after every page has been visited once so its
  results (model, importance, what-if, token scores) are cached.

Writes ``benchmarks/results/ui.csv`` and ``benchmarks/results/ui.md`` and prints a summary
(median and minimum over rounds: on a shared machine the minimum is the least disturbed run).
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
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from tests.test_e2e_browser import (BUSY, CHROMIUM, CHROMIUM_ARGS, free_port, stop_server)  # noqa: E402

GOALS = {"healthy -> first paint": 3.0, "page switch": 1.0}
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


def wait_healthy(server: subprocess.Popen, port: int, timeout_s: float = 300) -> None:
    """Return once ``/_stcore/health`` answers 200 (polled every 20 ms)."""
    deadline = time.perf_counter() + timeout_s
    while time.perf_counter() < deadline:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"streamlit exited with code {server.returncode}") from None
            time.sleep(0.02)
    raise TimeoutError(f"streamlit did not answer /_stcore/health within {timeout_s} s")


def wait_first_paint(page, title: str, since: float, timeout_s: float = 600) -> tuple[float, float]:
    """Seconds from ``since`` until the title shows, and until the title, the sidebar's model picker
    and all its page links are drawn (polled every 20 ms)."""
    deadline, title_s = time.perf_counter() + timeout_s, None
    heading = page.locator("[data-testid=stMain] h1").filter(has_text=title)
    picker = page.locator("[data-testid=stSidebar] [role=radiogroup]")
    links = page.locator("[data-testid=stSidebar] [data-testid=stPageLink-NavLink]")
    while time.perf_counter() < deadline:
        if title_s is None and heading.count():
            title_s = time.perf_counter() - since
        if title_s is not None and picker.count() and links.count() == len(PAGES):
            return title_s, time.perf_counter() - since
        time.sleep(0.02)
    raise TimeoutError(f"page {title!r} was not painted within {timeout_s} s")


def start_server(script: str, cwd: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", script, "--server.port", str(port), "--server.headless", "true",
         "--server.fileWatcherType", "none", "--browser.gatherUsageStats", "false"], cwd=cwd, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    return server, port


def empty_page_round(browser, tmp: Path) -> float:
    """The floor on this machine now: healthy -> title of a Streamlit page that draws only ``st.title``."""
    (tmp / "empty_page.py").write_text('import streamlit as st\n\nst.title("Model")\n')
    server, port = start_server("empty_page.py", tmp, dict(os.environ))
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(600_000)
        wait_healthy(server, port)
        healthy = time.perf_counter()
        page.goto(f"http://localhost:{port}/", wait_until="commit")
        page.locator("[data-testid=stMain] h1").filter(has_text="Model").wait_for()
        elapsed = time.perf_counter() - healthy
        page.close()
        return elapsed
    finally:
        stop_server(server)


def one_round(browser, model: str, cache: Path, screenshots: Path | None, switches: bool) -> dict[str, float]:
    env = dict(os.environ, COMPRESSION_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    start = time.perf_counter()
    server, port = start_server("app.py", ROOT, env)
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(600_000)
        wait_healthy(server, port)
        healthy = time.perf_counter()
        timings = {"server start -> healthy": healthy - start}
        page.goto(f"http://localhost:{port}/?model={model}", wait_until="commit")
        timings["healthy -> title"], timings["healthy -> first paint"] = wait_first_paint(page, "Model", healthy)
        if screenshots:
            page.screenshot(path=str(screenshots / "model-first-paint.png"))
        page.locator("[data-testid=stDataFrame]").first.wait_for()
        wait_rendered(page, "Model")
        timings["healthy -> Model page complete"] = time.perf_counter() - healthy
        if screenshots:  # the main area scrolls inside a fixed body, so a tall viewport shows all of it
            page.set_viewport_size({"width": 1400, "height": 2600})
            time.sleep(1)
            page.screenshot(path=str(screenshots / "model-complete.png"))
            page.set_viewport_size({"width": 1400, "height": 1000})
        # visit every page once so its results are cached, then time the switches
        for title in PAGES if switches else []:
            page.locator("[data-testid=stSidebar] [data-testid=stPageLink-NavLink]").filter(has=page.get_by_text(title, exact=True)).click()
            wait_rendered(page, title)
            time.sleep(0.3)
        for title in PAGES if switches else []:
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
    parser.add_argument("--screenshots", type=Path, default=None,
                        help="folder for the Model page at first paint and complete (last round's)")
    parser.add_argument("--switch-rounds", type=int, default=None,
                        help="time page switches in the first N rounds only (default: every round)")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds} must be at least 1")
    switch_rounds = args.rounds if args.switch_rounds is None else args.switch_rounds
    if not 1 <= switch_rounds <= args.rounds:
        parser.error(f"--switch-rounds {switch_rounds} must be between 1 and --rounds ({args.rounds})")
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    from playwright.sync_api import sync_playwright

    rows = []
    load_before = os.getloadavg()
    with sync_playwright() as p, tempfile.TemporaryDirectory() as tmp:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        for r in range(args.rounds):
            # a fresh store each round except that results computed in round 1 stay cached on disk,
            # as they do for a user who restarts the server
            empty = empty_page_round(browser, Path(tmp))  # interleaved, so both see the same load
            timings = one_round(browser, args.model, Path(tmp) / "cache", args.screenshots, r < switch_rounds)
            timings["empty Streamlit page: healthy -> title"] = empty
            rows += [{"round": r, "measure": k, "seconds": round(v, 3)} for k, v in timings.items()]
            print(f"round {r}: empty page's title {empty:.2f} s; Model page: healthy after "
                  f"{timings['server start -> healthy']:.2f} s, title {timings['healthy -> title']:.2f} s, first paint "
                  f"{timings['healthy -> first paint']:.2f} s, complete {timings['healthy -> Model page complete']:.2f} s; "
                  "switches " + ", ".join(f"{k.removeprefix('switch to ')} {v:.2f}" for k, v in timings.items()
                                          if k.startswith("switch")))
        browser.close()
    RESULTS.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["round", "measure", "seconds"])
        writer.writeheader()
        writer.writerows(rows)
    os.replace(f.name, RESULTS / "ui.csv")

    def values(prefix: str) -> list[float]:
        return [r["seconds"] for r in rows if r["measure"].startswith(prefix)]

    load_after = os.getloadavg()
    summary = [
        "# Dashboard responsiveness (measured in headless Chromium)", "",
        f"Command: `.venv/bin/python benchmarks/bench_ui.py --model {args.model} --rounds {args.rounds} "
        f"--switch-rounds {switch_rounds}`; "
        f"{os.cpu_count()} CPU cores, load average (1 / 5 / 15 min) at the start "
        f"{load_before[0]:.1f} / {load_before[1]:.1f} / {load_before[2]:.1f}, at the end "
        f"{load_after[0]:.1f} / {load_after[1]:.1f} / {load_after[2]:.1f}.", "",
        "| measure | median (s) | min (s) | max (s) | goal (s) |", "| --- | --- | --- | --- | --- |"]
    for label, prefix, goal in [
            ("server start -> healthy", "server start -> healthy", ""),
            ("empty Streamlit page (`st.title` only), healthy -> title: this machine's floor now",
             "empty Streamlit page", ""),
            ("healthy -> title", "healthy -> title", ""),
            ("healthy -> first paint (title, sidebar picker, page links)", "healthy -> first paint",
             f"{GOALS['healthy -> first paint']:g}"),
            ("healthy -> Model page complete (torch, transformers, model loaded)", "healthy -> Model page complete", ""),
            ("page switch, cached results (all pages)", "switch", f"{GOALS['page switch']:g}")]:
        v = values(prefix)
        summary.append(f"| {label} | {statistics.median(v):.2f} | {min(v):.2f} | {max(v):.2f} | {goal} |")
    summary += ["", "Per page switch (median over rounds):", "", "| page | switch (s) |", "| --- | --- |"]
    for title in PAGES:
        summary.append(f"| {title} | {statistics.median(values(f'switch to {title}')):.2f} |")
    text = "\n".join(summary) + "\n"
    with tempfile.NamedTemporaryFile("w", dir=RESULTS, delete=False, suffix=".tmp") as f:
        f.write(text)
    os.replace(f.name, RESULTS / "ui.md")
    print(text)


if __name__ == "__main__":
    main()
