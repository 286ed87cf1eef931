"""AppTest of the entry point and the Model page: the picker, the architecture, the measured
numbers, and one-line messages for bad model input (never a traceback)."""
import pytest
from streamlit.testing.v1 import AppTest

from tests.app_support import APP, TIMEOUT
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model", "llama", "clip", layers=3))


def run_model_page(source: str, data="shapes") -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_source"] = source
    at.session_state["data_source"] = data
    return at.run()


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def test_model_page_shows_architecture_counts_and_an_answer(tiny_folder):
    at = run_model_page(tiny_folder)
    assert not at.exception and not at.error
    assert at.title[0].value == "Model"
    stages = at.dataframe[0].value
    assert list(stages["stage"]) == ["vision tower", "projector", "language model"]
    assert list(stages["layers"])[2] == 3
    from compression.models import load, parameter_counts

    counts = parameter_counts(load(tiny_folder).model, load(tiny_folder).anatomy)
    assert int(stages["params"].sum()) == counts["total"]  # the table's parts add up to the whole model
    assert metrics(at)["Parameters"] == f"{counts['total'] / 1e6:,.2f} M"
    answer = [m.value for m in at.markdown if m.value.startswith("**Model's answer")]
    assert len(answer) == 1
    assert "Not measured yet" in " ".join(c.value for c in at.caption)


def test_measure_button_stores_a_measurement_that_the_next_visit_reuses(tiny_folder, monkeypatch):
    from ui import measure

    monkeypatch.setattr(measure, "LATENCY_REPEATS", 1)
    monkeypatch.setattr(measure, "LATENCY_WARMUP", 0)
    at = run_model_page(tiny_folder)
    at.select_slider(key="model_samples").set_value(20)
    at.button[0].click().run()
    assert not at.exception
    values = metrics(at)
    accuracy = float(values["Accuracy (exact match)"].rstrip("%"))
    assert 0 <= accuracy <= 100
    assert float(values["Prefill (image + question)"].split()[0]) > 0
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)
    again.session_state["model_source"] = tiny_folder
    again.session_state["data_source"] = "shapes"
    again.session_state["model_samples"] = 20
    again.run()
    assert metrics(again)["Accuracy (exact match)"] == values["Accuracy (exact match)"]  # read back, not re-run


def test_timing_kernels_picker_times_on_onednn_and_keeps_its_own_measurement(tiny_folder, monkeypatch):
    from compression.models import kernels
    from ui import measure

    if kernels.onednn_problem():
        pytest.skip(kernels.onednn_problem())
    monkeypatch.setattr(measure, "LATENCY_REPEATS", 1)
    monkeypatch.setattr(measure, "LATENCY_WARMUP", 0)
    at = run_model_page(tiny_folder)
    at.select_slider(key="model_samples").set_value(20)
    at.selectbox(key="hw_kernels").set_value("onednn").run()
    assert "Not measured yet" in " ".join(c.value for c in at.caption)  # nothing stored for onednn yet
    at.button[0].click().run()
    assert not at.exception and not at.error
    assert float(metrics(at)["Prefill (image + question)"].split()[0]) > 0
    assert "on onednn kernels" in " ".join(c.value for c in at.caption)
    stored = list((measure.cache_dir() / "ui" / "evals").glob("*-onednn.json"))
    assert len(stored) == 1 and '"kernels": "onednn"' in stored[0].read_text()


def test_config_only_model_shows_counts_but_no_measurement():
    at = run_model_page("config:llava-1.5-7b")
    assert not at.exception and not at.error
    total = metrics(at)["Parameters"]
    assert 7_000 < float(total.split()[0].replace(",", "")) < 7_130  # ~7.06 B, published LLaVA-1.5-7B
    assert any("config-only" in i.value for i in at.info)
    assert not [b for b in at.button if "Measure" in b.label]


@pytest.mark.parametrize("source, expected", [
    ("/no/such/folder", "does not exist"),
    ("nobody/no-such-model", "not in the local Hugging Face cache"),
    ("config:no-such-config", "no shipped config"),
])
def test_bad_model_input_is_one_line_on_the_page(source, expected):
    at = run_model_page(source)
    assert not at.exception
    assert len(at.error) == 1 and expected in at.error[0].value
    assert "\n" not in at.error[0].value


def test_folder_without_config_is_refused(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"not a model")
    at = run_model_page(str(tmp_path))
    assert not at.exception
    assert "no config.json" in at.error[0].value


def test_picker_switches_to_a_shipped_config_and_back():
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.sidebar.radio(key="picker_kind").set_value("Config only").run()
    assert not at.exception
    assert at.session_state["model_source"] == "config:bunny-v1.0-3b"  # the first shipped config
    assert at.query_params["model"] == "config:bunny-v1.0-3b"
    assert 3.1e3 < float(metrics(at)["Parameters"].split()[0].replace(",", "")) < 3.3e3  # Bunny-3B ~3.2 B
    at.sidebar.selectbox(key="picker_config").set_value("config:llava-1.5-7b").run()
    assert at.session_state["model_source"] == "config:llava-1.5-7b"
    at.sidebar.radio(key="picker_kind").set_value("Reference").run()
    assert at.session_state["model_source"] == "reference"


def test_typed_folder_becomes_the_source(tiny_folder):
    at = AppTest.from_file(APP, default_timeout=TIMEOUT).run()
    at.sidebar.radio(key="picker_kind").set_value("Local folder").run()
    assert at.session_state["model_source"] == "reference"  # nothing typed yet: unchanged
    at.sidebar.text_input(key="picker_folder").input(tiny_folder).run()
    assert at.session_state["model_source"] == tiny_folder
    assert not at.exception and not at.error
    assert at.sidebar.radio(key="picker_kind").value == "Local folder"


def test_the_source_radio_keeps_the_chosen_kind_across_pages(tiny_folder):
    at = run_model_page(tiny_folder)
    assert at.sidebar.radio(key="picker_kind").value == "Local folder"
    for page in ("budget", "importance", "compress"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception
        assert at.sidebar.radio(key="picker_kind").value == "Local folder", page
        assert at.sidebar.text_input(key="picker_folder").value == tiny_folder, page
        assert f"Using `{tiny_folder}`" in " ".join(c.value for c in at.sidebar.caption)


def test_a_users_model_waits_for_its_data_then_measures_on_it(tiny_folder, tmp_path, monkeypatch):
    from tests.tiny import write_llava_dataset
    from ui import measure

    monkeypatch.setattr(measure, "LATENCY_REPEATS", 1)
    monkeypatch.setattr(measure, "LATENCY_WARMUP", 0)
    data = write_llava_dataset(tmp_path, n=4, multi_turn=False, name="test.json")
    at = run_model_page(tiny_folder, data=None)
    assert not at.exception, [e.stack_trace for e in at.exception]
    assert not at.error
    assert any("Pick the data to measure" in i.value for i in at.info)  # never shapes, silently
    assert not [b for b in at.button if "Measure" in b.label]
    at.sidebar.radio(key="data_kind").set_value("LLaVA JSON + image folder").run()
    at.sidebar.text_input(key="data_path").input(str(data)).run()
    assert at.session_state["data_source"] == {"path": str(data)}
    assert not at.exception and not at.error
    at.select_slider(key="model_samples").set_value(20).run()
    [button] = [b for b in at.button if "Measure" in b.label]
    button.click().run()
    assert not at.exception
    assert "4 records of test.json" in " ".join(c.value for c in at.caption)
    assert any(m.value.startswith("**Question**") and "what colour is the square?" in m.value for m in at.markdown)
    at.switch_page("pages/token_maps.py").run()  # the data choice survives a page switch
    assert at.session_state["data_source"] == {"path": str(data)}
    assert at.sidebar.radio(key="data_kind").value == "LLaVA JSON + image folder"


def test_bad_data_is_one_line_on_the_page(tiny_folder, tmp_path):
    at = run_model_page(tiny_folder, data={"path": str(tmp_path / "missing.json")})
    assert not at.exception
    assert len(at.error) == 1 and "missing.json does not exist" in at.error[0].value
