"""End to end in a real browser: ``streamlit run app.py`` driven by headless Chromium (Playwright).

Choose the reference model, view importance, launch a small compression job, wait for it, see it
in Results, ask a question in Compare, export it. Screenshots of every step go to
``test-artifacts/`` (git-ignored). Needs Debian's chromium at /usr/bin/chromium
(``bash .ci/setup --browser``) and the shipped reference model.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]
# Busy: the app root's script-run state is not finished (running, rerun or stop requested, not yet
# connected), or a running indicator, spinner or stale skeleton is on screen. The status widget alone
# missed runs: it was absent while the Model page imported its modules after the model had loaded.
BUSY = ("() => !['notRunning', 'compilationError'].includes("
        "document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')) || "
        "!!document.querySelector('[data-testid=stStatusWidget]') || "
        "!!document.querySelector('[data-testid=stSpinner]') || !!document.querySelector('[data-testid=stSkeleton]')")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def start_server(cache: Path, port: int) -> subprocess.Popen:
    """``streamlit run app.py`` on ``port`` with its own runtime store; returns once /_stcore/health answers."""
    env = dict(os.environ, COMPRESSION_CACHE=str(cache), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port), "--server.headless", "true",
         "--server.address", "localhost", "--browser.gatherUsageStats", "false"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"http://localhost:{port}/_stcore/health", timeout=2) as r:
                if r.status == 200:
                    return server
        except OSError:
            time.sleep(0.25)
        if server.poll() is not None:
            raise RuntimeError(f"streamlit exited: {server.stdout.read().decode()[-2000:]}")
    stop_server(server)
    raise RuntimeError("streamlit did not answer /_stcore/health within 120 s")


def stop_server(server: subprocess.Popen) -> None:
    if server.poll() is None:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)


def settle(page, quiet_s: float = 1.0, timeout_s: float = 900) -> None:
    """Wait until the app has finished running: no running indicator, spinner or stale skeleton for ``quiet_s``."""
    deadline, quiet_since = time.time() + timeout_s, None
    while time.time() < deadline:
        if page.evaluate(BUSY):
            quiet_since = None
        elif quiet_since is None:
            quiet_since = time.time()
        elif time.time() - quiet_since >= quiet_s:
            return
        time.sleep(0.2)
    raise TimeoutError(f"the app was still busy after {timeout_s} s")


def open_page(page, title: str) -> None:
    """Switch page with the sidebar navigation (client side, same session), wait for its title."""
    page.locator("[data-testid=stSidebar] [data-testid=stPageLink-NavLink]").filter(
        has=page.get_by_text(title, exact=True)).click()
    page.locator("[data-testid=stMain] h1").filter(has_text=title).wait_for(timeout=120_000)


def no_exception(page) -> None:
    assert page.locator("[data-testid=stException]").count() == 0, page.locator("[data-testid=stException]").first.inner_text()


def choose(page, label: str, option: str) -> None:
    """Pick ``option`` in the selectbox labelled ``label``."""
    page.get_by_role("combobox", name=label, exact=True).click()
    page.get_by_role("option", name=option, exact=True).click()
    page.get_by_role("combobox", name=label, exact=True).and_(page.locator(f"[value='{option}']")).wait_for()


def fill_number(page, label: str, value) -> None:
    field = page.locator("[data-testid=stNumberInput]").filter(has=page.get_by_text(label, exact=True)).locator("input")
    field.fill(str(value))
    field.press("Tab")


def shot(page, name: str) -> Path:
    ARTIFACTS.mkdir(exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    page.screenshot(path=str(path))
    return path


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        pytest.fail(f"chromium is missing at {CHROMIUM}; run `bash .ci/setup --browser`")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def fill_text(page, label: str, value: str, sidebar: bool = False) -> None:
    where = page.locator("[data-testid=stSidebar]") if sidebar else page.locator("[data-testid=stMain]")
    field = where.get_by_label(label, exact=True)
    field.fill(value)
    field.press("Enter")


def pick_folder_and_data(page, port: int, model: Path, data: Path, before_data=None) -> None:
    """Open the app, then pick a local model folder and a LLaVA JSON file in the sidebar, as a user would."""
    page.goto(f"http://localhost:{port}/", wait_until="commit")
    page.locator("[data-testid=stMain] h1").filter(has_text="Model").wait_for()
    sidebar = page.locator("[data-testid=stSidebar]")
    settle(page)
    sidebar.get_by_text("Local folder", exact=True).click()
    settle(page)
    fill_text(page, "Folder (or a config.json)", str(model), sidebar=True)
    settle(page)
    if before_data is not None:
        before_data()
    sidebar.get_by_text("LLaVA JSON + image folder", exact=True).click()
    settle(page)
    fill_text(page, "File", str(data), sidebar=True)
    settle(page)


def test_users_model_and_data_from_the_sidebar_to_results(browser, tmp_path):
    """A llava-1.5-geometry folder of one's own and LLaVA-format data, picked in the sidebar: a job trains
    on the user's records and Results shows the accuracy measured on the user's test file."""
    from tests.tiny import save_llava15, write_llava_dataset

    model = save_llava15(tmp_path / "my-llava", layers=2)
    train = write_llava_dataset(tmp_path / "mydata", n=8, seed=1, name="train.json", image_dir="train")
    test = write_llava_dataset(tmp_path / "mydata", n=4, seed=2, multi_turn=False, name="test.json", image_dir="test")
    cache = tmp_path / "cache"
    server = start_server(cache, port := free_port())
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)
        pick_folder_and_data(page, port, model, test, before_data=lambda: page.get_by_text(
            "Pick the data to measure").wait_for())  # no data chosen: nothing is measured on shapes
        page.get_by_text("Model's answer:").wait_for()
        assert "what colour is the square?" in page.locator("[data-testid=stMain]").inner_text()
        no_exception(page)
        shot(page, "11-own-model")

        open_page(page, "Compress")
        settle(page)
        assert page.locator("[data-testid=stSidebar]").get_by_text("Local folder", exact=True).is_visible()
        page.get_by_label("Run name (optional)").fill("mine")
        choose(page, "Train", "projector")
        choose(page, "Distillation from the original", "none")
        page.get_by_label("Training data (recovery and calibration)").fill(str(train))
        fill_number(page, "Fraction of the training data", 1.0)
        fill_number(page, "Max steps (0 = one full epoch)", 2)
        fill_number(page, "Evaluation records (of the sidebar's data)", 4)
        page.get_by_role("button", name="Launch job").click()
        page.get_by_text("Finished: run").wait_for(timeout=600_000)
        no_exception(page)
        shot(page, "12-own-compress")
        [run] = list((cache / "runs").iterdir())
        import json

        metrics = json.loads((run / "metrics.json").read_text())
        assert metrics["data"]["train"]["label"] == "train.json" and metrics["data"]["eval"]["label"] == "test.json"

        open_page(page, "Results")
        settle(page)
        assert "4 records of test.json" in page.locator("[data-testid=stMain]").inner_text()
        no_exception(page)
        shot(page, "13-own-results")
    finally:
        stop_server(server)


def test_reference_model_from_importance_to_export(browser, reference_path, tmp_path):
    cache = tmp_path / "cache"
    server = start_server(cache, port := free_port())
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)

        # 1. the Model page, with the reference model chosen in the sidebar
        page.goto(f"http://localhost:{port}/", wait_until="commit")
        page.locator("[data-testid=stMain] h1").filter(has_text="Model").wait_for()
        page.locator("[data-testid=stSidebar]").get_by_text("Reference", exact=True).click()
        settle(page)
        assert "Using reference" in page.locator("[data-testid=stSidebar]").inner_text()
        page.get_by_text("Model's answer:").wait_for()
        no_exception(page)
        shot(page, "01-model")

        # 2. importance of layers, heads and neurons
        open_page(page, "Importance")
        settle(page)
        page.get_by_text("removes layers").first.wait_for()
        assert page.locator("[data-testid=stPlotlyChart]").count() == 3
        no_exception(page)
        shot(page, "02-importance")

        # 3. a small job: layerwise 30 %, projector finetuning for 2 steps, 8 test questions
        open_page(page, "Compress")
        page.get_by_label("Run name (optional)").fill("e2e")
        choose(page, "Train", "projector")
        choose(page, "Distillation from the original", "none")
        fill_number(page, "Fraction of the training data", 0.01)
        fill_number(page, "Max steps (0 = one full epoch)", 2)
        fill_number(page, "Evaluation records (of the sidebar's data)", 8)
        page.get_by_role("button", name="Launch job").click()
        page.get_by_text("Finished: run").wait_for(timeout=600_000)  # the fragment polls every 2 s
        assert "job=e2e-" in page.url  # a refresh or a new tab reconnects to it
        job_id = page.url.split("job=")[1].split("&")[0]
        no_exception(page)
        shot(page, "03-compress")
        runs = list((cache / "runs").iterdir())
        assert [r.name for r in runs] == [job_id] and (runs[0] / "metrics.json").is_file()

        # 4. the run against the original
        open_page(page, "Results")
        settle(page)
        assert page.locator("[data-testid=stPlotlyChart]").count() == 6  # the shipped study's fronts first
        page.locator("[data-testid=stDownloadButton]").wait_for()  # the table toolbar has its own CSV button
        no_exception(page)
        shot(page, "04-results")

        # 5. the same question to both models
        open_page(page, "Compare")
        settle(page)
        question = page.get_by_label("Question")
        question.fill("how many shapes are there ?")
        question.press("Enter")
        settle(page)
        assert page.get_by_text("Answer:", exact=True).count() == 2  # not "Expected answer:"
        no_exception(page)
        shot(page, "05-compare")

        # 6. export as a Hugging Face folder
        open_page(page, "Export")
        page.get_by_role("button", name="Export", exact=True).click()
        page.get_by_text("Exported to").wait_for(timeout=300_000)
        settle(page)
        assert (cache / "exports" / job_id / "model.safetensors").is_file()
        page.get_by_text("Load it").first.wait_for()  # the model card has the same heading
        no_exception(page)
        shot(page, "06-export")
    finally:
        stop_server(server)


def test_a_sweep_of_six_points_from_compress_to_its_front(browser, reference_path, tmp_path):
    """The reference model: a 2 x 3 sweep launched from the Compress page, its front drawn live on Results,
    a point clicked there becoming the run Compare opens."""
    cache = tmp_path / "cache"
    server = start_server(cache, port := free_port())
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)
        page.goto(f"http://localhost:{port}/?model=reference", wait_until="commit")
        page.locator("[data-testid=stMain] h1").filter(has_text="Model").wait_for()
        settle(page)

        # 1. the Sweep section: layer / width x 15 / 30 / 40 % x no recovery, 8 evaluation records a run
        open_page(page, "Compress")
        settle(page)
        page.get_by_role("button", name="Remove sft+hidden", exact=True).click()  # Recoveries: none only
        settle(page)
        fill_number(page, "Evaluation records per run", 8)
        page.get_by_label("Sweep name").fill("e2e")
        page.get_by_label("Sweep name").press("Enter")
        settle(page)
        page.get_by_text("6 runs", exact=True).wait_for()  # counted and estimated before launch
        page.get_by_role("button", name="Launch sweep").click()
        page.get_by_text("of 6 finished").first.wait_for()
        no_exception(page)
        shot(page, "sweep-01-compress")

        # 2. Results follows the sweep; its charts fill in as runs finish
        open_page(page, "Results")
        page.get_by_text("runs finished").first.wait_for()
        page.get_by_text("1 of 6 runs finished").first.wait_for(timeout=900_000)
        shot(page, "sweep-02-results-live")
        page.get_by_text("6 of 6 runs finished").first.wait_for(timeout=1_800_000)
        # the last run ends the polling with one rerun of the whole page, which adds the charts of every run
        page.wait_for_function("() => document.querySelectorAll('[data-testid=stPlotlyChart]').length == 6",
                               timeout=120_000)  # the sweep's two fronts, then the four charts of every finished run
        settle(page, 2)
        no_exception(page)
        charts = page.locator("[data-testid=stPlotlyChart]")
        front = charts.first
        assert "Pareto front" in front.inner_text() and "what-if estimate" in front.inner_text()
        runs = sorted(p.name for p in (cache / "runs").iterdir())
        assert len(runs) == 6 and all(name.startswith("e2e-") for name in runs)
        front.scroll_into_view_if_needed()
        shot(page, "sweep-03-front")

        # 3. clicking a run's point makes it the run Compare opens
        front.locator(".scatterlayer .trace:nth-child(3) path.point").first.click(force=True)
        page.get_by_text("Compare and Export open").wait_for()
        settle(page)
        chosen = page.locator("[data-testid=stCaptionContainer]").filter(has_text="Compare and Export open") \
            .inner_text().removeprefix("Compare and Export open ").rstrip(".").strip("`")
        assert chosen in runs
        shot(page, "sweep-04-chosen")
        open_page(page, "Compare")
        settle(page)
        assert page.get_by_role("combobox", name="Run", exact=True).and_(page.locator(f"[value='{chosen}']")).count() == 1
        no_exception(page)
        shot(page, "sweep-05-compare")
    finally:
        stop_server(server)


def test_a_qwen2_5_vl_model_through_model_importance_and_token_maps(browser, tmp_path):
    """Another family in the browser: a tiny Qwen2.5-VL (its merger, M-RoPE, a visual-token count that
    follows the image) picked as a local folder with LLaVA-format data: the Model page answers, Importance
    scores its layers on the data, Token maps draws its visual tokens."""
    from tests.families import save_qwen2_5_vl
    from tests.tiny import write_llava_dataset

    model = save_qwen2_5_vl(tmp_path / "my-qwen")
    data = write_llava_dataset(tmp_path / "mydata", n=6, seed=3, multi_turn=False, name="test.json")
    server = start_server(tmp_path / "cache", port := free_port())
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 1800})
        page.set_default_timeout(120_000)
        pick_folder_and_data(page, port, model, data)
        page.get_by_text("Model's answer:").wait_for()
        shot(page, "21-qwen-model")
        main = page.locator("[data-testid=stMain]").inner_text()
        assert "Family: Qwen2.5-VL (qwen2_5_vl)" in main and "language model qwen2" in main
        no_exception(page)

        open_page(page, "Importance")
        settle(page)
        shot(page, "22-qwen-importance")
        no_exception(page)
        assert "records of test.json" in page.locator("[data-testid=stMain]").inner_text()
        assert page.locator(".js-plotly-plot").count() >= 1

        open_page(page, "Token maps")
        settle(page)
        shot(page, "23-qwen-token-maps")
        no_exception(page)
        assert page.locator(".js-plotly-plot").count() >= 1
    finally:
        stop_server(server)
