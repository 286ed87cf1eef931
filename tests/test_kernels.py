"""CPU kernels for timing: oneDNN linears on pre-packed weights give eager's outputs, leave the model as it was,
run single rows and gradients on eager, refuse what does not fit, and reach latency, eval and recipes."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from compression.measure import evaluate
from compression.models import kernels
from tests.tiny import shapes_records, tiny_llava, tiny_loaded

pytestmark = pytest.mark.skipif(kernels.onednn_problem() is not None, reason=str(kernels.onednn_problem()))


def _linears(model):
    return {name: m for name, m in model.named_modules() if type(m) is nn.Linear}


@pytest.mark.parametrize("language,vision", [("llama", "clip"), ("qwen2", "siglip"), ("gemma", "clip")])
def test_packed_forward_equals_eager_and_the_model_is_restored(language, vision):
    model, processor, _ = tiny_llava(language, vision, layers=2)
    loaded = tiny_loaded(language, vision, layers=2)
    inputs = evaluate.latency_inputs(loaded, shapes_records("test", 1)[0])
    before = _linears(model)
    lm_head = model.get_output_embeddings()
    with torch.no_grad():
        ref = model(**inputs).logits
        with kernels.packed([model]) as report:
            swapped = [m for m in model.modules() if isinstance(m, kernels.PackedLinear)]
            out = model(**inputs).logits
            assert not isinstance(model.get_output_embeddings(), kernels.PackedLinear)
    # every plain linear but the LM head: vision tower, projector, decoder layers
    assert report.linears == len(before) - 1 == len(swapped) and report.models == 1
    assert report.packed_bytes == sum(m.weight.numel() * 4 for m in before.values() if m is not lm_head)
    rel = ((out - ref).abs().max() / ref.abs().max()).item()
    assert rel < 1e-5, rel
    assert _linears(model) == before  # the very same modules back in place
    assert not any(isinstance(m, kernels.PackedLinear) for m in model.modules())


def test_generation_is_unchanged_and_single_rows_run_eager():
    loaded = tiny_loaded(layers=2)
    inputs = evaluate.latency_inputs(loaded, shapes_records("test", 1)[0])
    with torch.no_grad():
        ref = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
    rows = {"eager": 0}
    with kernels.packed([loaded.model]):
        first = loaded.model.model.language_model.layers[0].self_attn.q_proj
        assert isinstance(first, kernels.PackedLinear)
        hook = first.eager.register_forward_hook(lambda m, i, o: rows.__setitem__("eager", rows["eager"] + 1))
        with torch.no_grad():
            out = loaded.model.generate(**inputs, max_new_tokens=6, do_sample=False)
        hook.remove()
        x = torch.randn(1, 5, first.in_features)
        with torch.no_grad():
            assert torch.allclose(first(x), first.eager(x), atol=1e-6)
    assert torch.equal(out, ref)
    # the first decoder linear sees the prefill (many rows, packed) and 5 decode steps (one row each, eager)
    assert rows["eager"] == 5


def test_gradients_run_on_the_eager_module():
    model, _, _ = tiny_llava(layers=1)
    x = torch.randn(1, 7, model.config.text_config.hidden_size, requires_grad=True)
    with kernels.packed([model]):
        layer = model.model.language_model.layers[0]
        out = layer.mlp(x).sum()
        out.backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert layer.mlp.down_proj.weight.grad is not None


def test_a_module_shared_by_two_models_is_packed_once():
    import copy
    import itertools

    a, _, _ = tiny_llava(layers=2)
    memo = {id(t): t for t in itertools.chain(a.parameters(), a.buffers())}
    b = copy.deepcopy(a, memo)  # new modules, same tensors: each model's linears are its own
    b.model.language_model.layers[1] = a.model.language_model.layers[1]  # one layer module shared
    with kernels.packed([a, b, a]) as report:
        assert b.model.language_model.layers[1].mlp.up_proj is a.model.language_model.layers[1].mlp.up_proj
        assert isinstance(a.model.language_model.layers[1].mlp.up_proj, kernels.PackedLinear)
    per_model = len(_linears(a)) - 1
    per_layer = 7  # q, k, v, o, gate, up, down
    assert report.models == 2 and report.linears == 2 * per_model - per_layer


def test_refusals_name_the_value():
    model, _, _ = tiny_llava(layers=1)
    with pytest.raises(kernels.KernelError, match=r"kernels 'fast': expected one of eager, onednn"):
        with kernels.packed([model], "fast"):
            pass
    with pytest.raises(kernels.KernelError, match=r"packed copies need .* GiB and .* GiB is free"):
        with kernels.packed([model], headroom=1e-12):
            pass
    assert not any(isinstance(m, kernels.PackedLinear) for m in model.modules())
    with kernels.packed([model], "eager") as report:
        assert report.linears == 0 and not any(isinstance(m, kernels.PackedLinear) for m in model.modules())


def test_latency_on_onednn_reports_its_kernels_and_restores(monkeypatch):
    a, _, _ = tiny_llava(layers=1)
    inputs = evaluate.latency_inputs(tiny_loaded(layers=1), shapes_records("test", 1)[0])
    before = _linears(a)
    packed_calls = []
    original = evaluate._time_one

    def spy(model, fed, decode_tokens):
        out = original(model, fed, decode_tokens)
        packed_calls.append(sum(m.packed_calls for m in model.modules() if isinstance(m, kernels.PackedLinear)))
        return out

    monkeypatch.setattr(evaluate, "_time_one", spy)
    result = evaluate.latency({"a": a}, inputs, repeats=2, warmup=0, decode_tokens=2, kernels="onednn")
    # each prefill runs every linear but the LM head on the packed weights (decode steps run eager)
    n_packed = len(before) - 1
    assert packed_calls == [n_packed, 2 * n_packed]
    assert result["a"]["kernels"] == "onednn" and result["a"]["prefill_ms"] > 0
    assert result["a"]["decode_tokens_per_s"] > 0
    assert _linears(a) == before
    with pytest.raises(ValueError, match="kernels 'x'"):
        evaluate.latency({"a": a}, inputs, kernels="x")


def test_recipe_and_cli_carry_the_kernels(tmp_path):
    from compression.cli.main import main
    from compression.runs.recipe import HardwareSpec, Recipe

    assert HardwareSpec().kernels == "eager"
    assert HardwareSpec(kernels="onednn").kernels == "onednn"
    with pytest.raises(ValueError, match="kernels"):
        HardwareSpec(kernels="fast")
    recipe = Recipe.model_validate({"model": "reference", "hardware": {"kernels": "onednn", "processes": 1}})
    assert recipe.hardware.kernels == "onednn"
    with pytest.raises(SystemExit) as e:
        main(["eval", "--model", "reference", "--kernels", "fast"])
    assert e.value.code == 2


def test_what_cannot_be_packed_stays_eager_and_is_counted():
    model, _, _ = tiny_llava(layers=1)
    model.model.multi_modal_projector.to(torch.float16)  # fp16 has no packed path here
    n_projector = sum(1 for m in model.model.multi_modal_projector.modules() if type(m) is nn.Linear)
    with kernels.packed([model]) as report:
        assert not any(isinstance(m, kernels.PackedLinear) for m in model.model.multi_modal_projector.modules())
    assert report.linears == len(_linears(model)) - 1 - n_projector
    assert report.notes == [f"{n_projector} linear(s) left eager (dtype, device or quantization not packable)"]


def test_a_recipe_times_both_models_on_its_kernels(tmp_path, monkeypatch):
    from compression.runs import pipeline
    from compression.runs.recipe import Recipe

    seen = []
    real = evaluate.latency

    def short_latency(models, inputs, **kwargs):
        seen.append((sorted(models), kwargs.get("kernels")))
        return real(models, inputs, **{**kwargs, "repeats": 1, "warmup": 0, "decode_tokens": 2})

    monkeypatch.setattr(evaluate, "latency", short_latency)
    recipe = Recipe.from_dict({
        "model": "reference", "prune": {"method": "layer", "ratio": 0.2}, "recovery": {"mode": "none"},
        "data": {"calibration": {"source": "shapes", "samples": 2}, "eval": {"source": "shapes", "samples": 2}},
        "hardware": {"device": "cpu", "dtype": "fp32", "kernels": "onednn"}})
    metrics = pipeline.run_recipe(recipe, tmp_path / "run")
    assert seen == [(["compressed", "original"], "onednn")]
    assert metrics["latency_note"].endswith("onednn kernels")
    assert metrics["original"]["prefill_ms"] > 0 and metrics["compressed"]["prefill_ms"] > 0


def test_run_flags_override_the_recipes_hardware_and_keep_the_rest(tmp_path, monkeypatch):
    """``run --device cpu --kernels onednn`` changes those fields only: processes and parallelism stay."""
    from compression.cli.main import main
    from compression.runs import pipeline

    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: reference\nhardware: {device: auto, dtype: fp32, processes: 2, parallelism: ddp}\n")
    seen = {}

    def capture(recipe, out, **kwargs):
        seen.update(recipe.hardware.model_dump())
        return {}

    monkeypatch.setattr(pipeline, "run_recipe", capture)
    assert main(["run", str(recipe), "--device", "cpu", "--kernels", "onednn", "--out", str(tmp_path / "run")]) == 0
    assert seen == {"device": "cpu", "dtype": "fp32", "processes": 2, "parallelism": "ddp", "kernels": "onednn"}
