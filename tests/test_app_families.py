"""AppTest: the Model page with a tiny model of every family (the architecture, parts adding up, an answer)."""
import pytest

from tests.app_support import app
from tests.families import BUILDERS
from tests.tiny import write_llava_dataset


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> str:
    return str(write_llava_dataset(tmp_path_factory.mktemp("data"), n=4))


@pytest.mark.parametrize("name", list(BUILDERS))
def test_model_page_shows_every_family(name, tmp_path, data):
    from compression.models import families, load, parameter_counts

    folder = str(BUILDERS[name](tmp_path / "model"))
    at = app(folder, data={"path": data})
    assert not at.exception and not at.error, [e.value for e in at.error]
    stages = at.dataframe[0].value
    assert list(stages["stage"]) == ["vision tower", "projector", "language model"]
    loaded = load(folder)
    assert int(stages["params"].sum()) == parameter_counts(loaded.model, loaded.anatomy)["total"]
    assert list(stages["layers"])[2] == loaded.anatomy.num_layers
    assert list(stages["type"])[2] == loaded.anatomy.language_model_type.capitalize()
    assert loaded.anatomy.family == families.family_for(name).name
    assert len([m.value for m in at.markdown if m.value.startswith("**Model's answer")]) == 1
