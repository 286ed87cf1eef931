"""Models bigger than memory: layer-sequential importance equals the whole model's; streaming surgery writes the
folder apply_plan + save_pruned writes, tensor for tensor; the CLI's --sequential / --streaming."""
import json

import pytest
import torch
from safetensors.torch import load_file

from compression import models
from compression.cli.main import main
from compression.measure import memory
from compression.methods import importance
from compression.methods.prune import apply_plan, make_plan, save_pruned
from compression.methods.sequential import sequential_importance
from compression.methods.streaming import stream_prune
from compression.models.shards import Checkpoint
from tests.families import BUILDERS
from tests.tiny import write_llava_dataset

FAMILIES = ["llava", "qwen2_vl", "gemma3"]  # 1-D RoPE; 3-D M-RoPE; sliding-window layers + tied head + q/k norms


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("data"), n=6)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: BUILDERS[name](root / name) for name in FAMILIES + ["qwen3_vl"]}


def _relative(a, b) -> float:
    a, b = torch.tensor(list(a), dtype=torch.float64), torch.tensor(list(b), dtype=torch.float64)
    return float(((a - b).abs() / a.abs().clamp_min(1e-12)).max())


@pytest.mark.parametrize("name", FAMILIES)
def test_sequential_scores_equal_the_whole_models(name, folders, data):
    whole = models.load(str(folders[name]))
    seq = models.load(str(folders[name]), sequential=True)
    assert all(p.device.type == "meta" for p in seq.model.parameters())  # no weight read until needed
    records = importance.calibration_selection({"path": str(data)}, n=4).records
    batches = importance.calibration_batches(whole.prompt, records, batch_size=2)  # two batches, padded rows
    frames = sequential_importance(seq, batches)
    layers = importance.layer_importance(whole, batches)
    assert frames[("layers", "block_influence")][["layer", "method"]].equals(layers[["layer", "method"]])
    assert _relative(layers["score"], frames[("layers", "block_influence")]["score"]) < 1e-5
    for kind in ("heads", "neurons"):
        for method in ("activation", "magnitude"):
            expected = importance.unit_importance(whole, batches, kind, method)
            got = frames[(kind, method)]
            assert list(got.columns) == list(expected.columns) and len(got) == len(expected)
            assert got.drop(columns="score").equals(expected.drop(columns="score"))
            assert _relative(expected["score"], got["score"]) < 1e-5
    # the layers and the parts went back to meta after use
    assert all(p.device.type == "meta" for p in seq.model.parameters())


@pytest.mark.parametrize("name", FAMILIES)
def test_sequential_taylor_equals_the_whole_models(name, folders, data):
    """Forward layer by layer keeping each layer's input, the loss through the norm and the LM head, backward
    layer by layer in reverse: the whole model's lean Taylor scores, over padded mini-batches."""
    whole = models.load(str(folders[name]))
    seq = models.load(str(folders[name]), sequential=True)
    records = importance.calibration_selection({"path": str(data)}, n=4).records
    batches = importance.calibration_batches(whole.prompt, records, batch_size=2)
    frames = sequential_importance(seq, batches, (), ("taylor",))
    for kind in ("heads", "neurons"):
        expected = importance.unit_importance(whole, batches, kind, "taylor")
        got = frames[(kind, "taylor")]
        assert got.drop(columns="score").equals(expected.drop(columns="score"))
        assert _relative(expected["score"], got["score"]) < 1e-5
        assert float(expected["score"].min()) > 0  # every unit on the loss path got a gradient
    assert all(p.device.type == "meta" for p in seq.model.parameters())
    with pytest.raises(ValueError, match="answer labels"):
        sequential_importance(seq, [{k: v for k, v in b.items() if k != "labels"} for b in batches], (), ("taylor",))


def test_sequential_refuses_deepstack(folders, data):
    seq = models.load(str(folders["qwen3_vl"]), sequential=True)
    records = importance.calibration_selection({"path": str(data)}, n=2).records
    with pytest.raises(ValueError, match="DeepStack"):
        sequential_importance(seq, records)
    with pytest.raises(ValueError, match="DeepStack"):
        sequential_importance(seq, records, unit_methods=("taylor",))


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


@pytest.mark.parametrize("name, method, options", [
    ("llava", "layer", {}), ("llava", "width", {"layer_range": (1, 3)}),  # non-uniform: llava_pruned + its code
    ("llava", "width", {"layer_range": (0, 3), "servable": True}),  # uniform: plain transformers
    ("qwen2_vl", "width", {"layer_range": (1, 3)}), ("gemma3", "layer", {}), ("gemma3", "width", {"layer_range": (1, 3)})])
def test_streaming_prune_equals_in_memory_prune(name, method, options, folders, tmp_path):
    folder = folders[name]
    loaded = models.load(str(folder))
    plan = make_plan(loaded, method, ratio=0.2, **options)
    model, anatomy = apply_plan(loaded.model, loaded.anatomy, plan)
    in_memory = save_pruned(model, loaded.processor, tmp_path / "in-memory", plan)
    streamed = stream_prune(folder, plan, tmp_path / "streamed", shard_bytes=40_000)  # many shards
    a, b = _tensors(in_memory), _tensors(streamed)
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    assert json.loads((in_memory / "config.json").read_text()) == json.loads((streamed / "config.json").read_text())
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(b) and len(set(index["weight_map"].values())) > 1
    assert sorted(p.name for p in in_memory.iterdir() if not p.name.endswith(".safetensors")) == sorted(
        p.name for p in streamed.iterdir() if not p.name.endswith(".safetensors") and p.name != "model.safetensors.index.json")
    reloaded = models.load(str(streamed))
    assert reloaded.anatomy.heads_per_layer == anatomy.heads_per_layer
    assert reloaded.anatomy.intermediate_per_layer == anatomy.intermediate_per_layer
    assert not list(tmp_path.glob(".streamed.tmp-*"))


def test_streaming_keeps_the_stored_precision_and_refuses_a_used_folder(folders, tmp_path):
    folder = folders["llava"]
    loaded = models.load(str(folder), dtype=torch.bfloat16)
    bf16 = save_pruned(loaded.model, loaded.processor, tmp_path / "bf16")  # a bf16 folder to stream from
    plan = make_plan(models.load(str(bf16), sequential=True), "layer", ratio=0.3)
    out = stream_prune(bf16, plan, tmp_path / "out")
    assert {t.dtype for t in _tensors(out).values()} == {torch.bfloat16}
    assert Checkpoint(out).nbytes < Checkpoint(bf16).nbytes
    with pytest.raises(ValueError, match="already exists and is not empty"):
        stream_prune(bf16, plan, out)


def test_memory_plan_terms_and_fit(folders):
    loaded = models.load(str(folders["llava"]), sequential=True)
    sizes = memory.model_sizes(loaded.model, loaded.anatomy)
    whole = models.load(str(folders["llava"]))
    assert sizes.total == models.parameter_counts(whole.model, whole.anatomy)["total"]
    capture, sweep = memory.sequential_analysis_plans(sizes, torch.float32, samples=8, tokens=100, batch_size=8,
                                                      runtime=0)
    assert capture.terms["parts"] == sizes.parts * 4 and "layer" not in capture.terms  # the layers are on meta
    assert sweep.terms["layer"] == sizes.layer * 4 and sweep.terms["hidden"] == 16 * 100 * sizes.hidden_size * 4
    assert "parts" not in sweep.terms  # released after the capture
    peak = memory.sequential_analysis_plan(sizes, torch.float32, 8, 100, 8, 0).peak
    assert peak == max(capture.peak, sweep.peak) < memory.whole_analysis_plan(sizes, torch.float32, 8, 100, 8, 0).peak
    assert memory.weight_bytes(folders["llava"]) == Checkpoint(folders["llava"]).nbytes
    assert memory.weight_bytes(folders["llava"], torch.bfloat16) * 2 == memory.weight_bytes(folders["llava"])
    assert memory.fits(folders["llava"])
    # Taylor: the forward sweep keeps every layer's input; the backward sweep adds a layer's gradients
    *_, backward = memory.sequential_analysis_plans(sizes, torch.float32, 8, 100, 8, 0, taylor=True)
    assert backward.terms["kept_inputs"] == 3 * 8 * 100 * sizes.hidden_size * 4  # 3 decoder layers
    assert backward.terms["gradients"] == sizes.layer * 4
    assert memory.sequential_analysis_plan(sizes, torch.float32, 8, 100, 8, 0, taylor=True).peak > peak


def test_cli_sequential_analyze_and_streaming_prune(folders, data, tmp_path, capsys):
    folder = str(folders["llava"])
    assert main(["analyze", "--model", folder, "--kind", "layers", "--data", str(data), "--samples", "4",
                 "--sequential", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["sequential"] and payload["method"] == "block_influence" and len(payload["scores"]) == 3
    whole = importance.layer_importance(models.load(folder), importance.calibration_selection(
        {"path": str(data)}, n=4))
    assert _relative(whole["score"], [r["score"] for r in payload["scores"]]) < 1e-5
    out = tmp_path / "pruned"
    assert main(["prune", "--model", folder, "--method", "width", "--ratio", "0.2", "--layer-range", "1:3",
                 "--data", str(data), "--samples", "4", "--scorer", "activation", "--streaming", "--out", str(out),
                 "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["streaming"] and payload["scorer"] == "activation" and (out / "config.json").is_file()
    assert models.load(str(out)).anatomy.intermediate_per_layer == payload["widths_after"]["intermediate_size"]
    # Taylor (the default scorer) streams too, and plans what the whole model's Taylor scores plan
    taylor = tmp_path / "taylor"
    assert main(["prune", "--model", folder, "--method", "width", "--ratio", "0.2", "--layer-range", "1:3",
                 "--data", str(data), "--samples", "4", "--streaming", "--out", str(taylor), "--json"]) == 0
    streamed = json.loads(capsys.readouterr().out)
    assert streamed["streaming"] and streamed["scorer"] == "taylor"
    assert main(["prune", "--model", folder, "--method", "width", "--ratio", "0.2", "--layer-range", "1:3",
                 "--data", str(data), "--samples", "4", "--out", str(tmp_path / "whole"), "--json"]) == 0
    in_memory = json.loads(capsys.readouterr().out)
    assert streamed["widths_after"] == in_memory["widths_after"]
    # removal loss needs the whole model: one line, exit 2, nothing written
    bad = tmp_path / "bad"
    assert main(["prune", "--model", folder, "--method", "layer", "--ratio", "0.3", "--data", str(data),
                 "--scorer", "removal_loss", "--streaming", "--out", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "needs the whole model" in err and len(err.strip().splitlines()) == 1 and not bad.exists()
    assert main(["analyze", "--model", "reference", "--kind", "layers", "--sequential"]) == 2
    assert "needs a local model folder" in capsys.readouterr().err


def test_cli_goes_sequential_by_itself_when_the_weights_do_not_fit(folders, data, monkeypatch, capsys):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 1000)  # less than any model
    assert main(["analyze", "--model", str(folders["llava"]), "--kind", "neurons", "--method", "magnitude",
                 "--data", str(data), "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sequential"] and "do not fit" not in captured.out
    assert "GB free: sequential" in captured.err
