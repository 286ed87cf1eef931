"""A model bigger than the memory it is given loads offloaded (Accelerate's device_map="auto", an offload
folder on disk) and answers exactly as the model loaded whole."""
import torch
from safetensors import safe_open

from compression.measure import memory
from compression.data.sources import open_source, select
from compression.measure import evaluate
from compression.models import load
from tests.tiny import save_tiny


def test_a_model_that_does_not_fit_is_offloaded_and_answers_the_same(tmp_path, monkeypatch):
    folder = save_tiny(tmp_path / "model")
    whole = load(str(folder))
    assert "placement" not in whole.extras  # it fits: the plain path
    half = load(str(folder), max_memory={"cpu": 200_000})  # 200 kB of "RAM": the rest goes to disk
    placement = half.extras["placement"]
    assert placement["offloaded"] is True and placement["modules"].get("disk", 0) >= 1
    with safe_open(str(folder / "model.safetensors"), "pt") as f:  # fp32: 4 bytes per stored element
        stored = sum(4 * torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
    assert placement["weights_bytes"] == stored
    assert half.hardware_label.startswith("offloaded: ") and "disk" in half.hardware_label
    # what every forward pass moves back in: most of a model given 200 kB, never more than all of it
    assert 0.5 * stored <= placement["offloaded_bytes"] <= stored
    from ui.common import offload_note

    note = offload_note(half)
    assert f"reads {placement['offloaded_bytes'] / 2**30:.1f} GiB back in" in note and "s more per forward pass" in note

    record = select(open_source("shapes", "eval"), samples=1).records[0]
    inputs = evaluate.latency_inputs(whole, record)
    with torch.no_grad():
        a = whole.model(**evaluate._to_model(inputs, whole.model)).logits
        b = half.model(**evaluate._to_model(inputs, half.model)).logits
    assert torch.equal(a, b)
    assert evaluate.generate(whole.model, whole.prompt, inputs, 4) == evaluate.generate(half.model, half.prompt, inputs, 4)

    # the "auto" rule: weights above 90 % of the device's free memory are offloaded without being asked
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": stored // 2)
    assert load(str(folder)).extras["placement"]["offloaded"] is True
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": stored * 2)
    assert "placement" not in load(str(folder)).extras
