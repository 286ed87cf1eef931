"""AppTest of the entry point and the Model page: the picker, the architecture, the measured
numbers, and one-line messages for bad model input (never a traceback)."""
import pytest
from streamlit.testing.v1 import AppTest

from tests.app_support import APP, TIMEOUT
from tests.tiny import save_tiny


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    return str(save_tiny(tmp_path_factory.mktemp("tiny") / "model", "llama", "clip", layers=3))


def run_model_page(source: str) -> AppTest:
    at = AppTest.from_file(APP, default_timeout=TIMEOUT)
    at.session_state["model_source"] = source
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
    accuracy = float(values["Exact-match accuracy"].rstrip("%"))
    assert 0 <= accuracy <= 100
    assert float(values["Prefill (image + question)"].split()[0]) > 0
    again = AppTest.from_file(APP, default_timeout=TIMEOUT)
    again.session_state["model_source"] = tiny_folder
    again.session_state["model_samples"] = 20
    again.run()
    assert metrics(again)["Exact-match accuracy"] == values["Exact-match accuracy"]  # read back, not re-run


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
