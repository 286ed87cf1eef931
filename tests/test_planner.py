"""Planner (budget -> plan) and what-if estimates from a config alone."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from compression import models
from compression.measure import whatif
from compression.methods.prune import Plan, auto_multiple, head_configurations, make_plan, what_if
from tests.tiny import tiny_config


@pytest.fixture(scope="module")
def eight_layers():
    """A config-only (meta device) model: 8 layers, 6 heads / 2 KV heads, intermediate 512, like the reference."""
    config = tiny_config("llama", "clip", num_key_value_heads=2, num_attention_heads=6, layers=8, hidden_size=192,
                         intermediate_size=512)
    return models.model_from_config(config), models.anatomy_from_config(config)


@pytest.fixture(scope="module")
def llava7b():
    return models.load("config:llava-1.5-7b")


def test_layer_plan_follows_scores_and_counts_exactly(eight_layers):
    model, anatomy = eight_layers
    scores = pd.DataFrame({"layer": range(8), "score": [9, 1, 8, 2, 7, 3, 6, 5], "method": "block_influence"})
    plan = make_plan(eight_layers, "layer", ratio=0.25, scores=scores)
    assert plan.layers_removed == [1, 3]  # the two lowest block influences, not contiguous
    per_layer = sum(p.numel() for p in anatomy.decoder_layers(model)[0].parameters())
    assert plan.params_before - plan.params_after == 2 * per_layer
    assert plan.ratio_achieved == pytest.approx(2 * per_layer / plan.language_params_before)
    assert plan.scorer == "block_influence" and plan.widths_after["num_attention_heads"] == [6] * 6
    no_scores = make_plan(eight_layers, "layer", ratio=0.25)
    assert no_scores.layers_removed == [5, 6]  # deepest layers before the last


def test_width_plan_default_range_gqa_and_multiples_of_32(eight_layers):
    plan = make_plan(eight_layers, "width", ratio=0.2)
    assert plan.layer_range == (3, 7)  # the paper's default: first 3 and the last layer left whole
    assert sorted(plan.heads_kept) == [3, 4, 5, 6]
    assert all(len(v) % 32 == 0 for v in plan.neurons_kept.values())
    assert any("multiples of 32" in note for note in plan.notes)
    assert abs(plan.ratio_achieved - 0.2) < 0.03
    assert plan.widths_after["num_attention_heads"][:3] == [6, 6, 6]
    assert head_configurations(6, 2) == [(1, 1), (1, 2), (2, 1), (1, 3), (2, 2), (2, 3)]


def test_width_plan_rounds_neurons_to_a_requested_multiple(llava7b):
    plain = make_plan(llava7b, "width", ratio=0.2, neuron_multiple=32)
    rounded = make_plan(llava7b, "width", ratio=0.2, neuron_multiple=128)
    auto = make_plan(llava7b, "width", ratio=0.2)  # the default: 128 for layers of 11008 neurons
    assert {len(v) for v in plain.neurons_kept.values()} == {8416}  # a multiple of 32, not of 64
    assert {len(v) for v in rounded.neurons_kept.values()} == {8448}  # 66 x 128
    assert abs(rounded.ratio_achieved - 0.2) < 0.01 and any("multiples of 128" in n for n in rounded.notes)
    assert auto.neurons_kept == rounded.neurons_kept and any("auto for layers of this width" in n for n in auto.notes)
    # auto: 128 from 4096 neurons, 64 from 2048, else 32 (the reference model's 512)
    assert [auto_multiple(n) for n in (11008, 4096, 2048, 2112, 2080, 512, 100)] == [128, 128, 64, 64, 32, 32, 32]
    with pytest.raises(ValueError, match="neuron_multiple 48"):
        make_plan(llava7b, "width", ratio=0.3, neuron_multiple=48)


def test_width_plan_keeps_highest_scored_units(eight_layers):
    _, anatomy = eight_layers
    heads = pd.DataFrame([{"layer": i, "head": h, "kv_head": h // 3, "score": float(h == 5 or h == 4) + h / 100,
                           "method": "taylor"} for i in range(8) for h in range(6)])
    neurons = pd.DataFrame([{"layer": i, "neuron": j, "score": float(j), "method": "taylor"}
                            for i in range(8) for j in range(512)])
    plan = make_plan(eight_layers, "width", ratio=0.3, layer_range=(0, 8), scores={"heads": heads, "neurons": neurons})
    kept = len(plan.neurons_kept[0])
    assert plan.neurons_kept[0] == list(range(512 - kept, 512))
    assert all(set(v) <= {3, 4, 5} or len(v) > 3 for v in plan.heads_kept.values())
    assert 5 in plan.heads_kept[0] and 4 in plan.heads_kept[0]


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="layer", ratio=0.95), r"ratio 0.95 would remove all 8 layers; at most 0.8\d is possible"),
    (dict(method="width", ratio=0.6), r"at most 0.4\d is possible .* widen the layer range"),
    (dict(method="width", ratio=0.3, layer_range=(5, 5)), r"layer range \[5, 5\) is empty"),
    (dict(method="layer", ratio=0.01), r"removes no layer"),
    (dict(method="layer", ratio=1.2), r"must be between 0 and 1"),
    (dict(method="layer", ratio=0.3, target_mb=1.0), r"exactly one budget"),
    (dict(method="width", target_mb=1e6), r"below the current size"),
    (dict(method="depth", ratio=0.3), r"'layer' or 'width'"),
])
def test_infeasible_budgets_raise_the_reason(eight_layers, kwargs, message):
    with pytest.raises(ValueError, match=message) as err:
        make_plan(eight_layers, **kwargs)
    assert "\n" not in str(err.value)


def test_target_size_gives_the_smallest_plan_that_fits(eight_layers):
    full = make_plan(eight_layers, "layer", ratio=0.125)
    size_mb = (full.bytes_after["fp32"] + 4 * (full.params_before - full.params_after)) / 1e6
    plan = make_plan(eight_layers, "layer", target_mb=size_mb - 0.01)
    assert plan.bytes_after["fp32"] / 1e6 <= size_mb - 0.01
    assert len(plan.layers_removed) == 1  # one layer is enough; two would overshoot
    width = make_plan(eight_layers, "width", target_mb=size_mb * 0.9, target_dtype="fp32")
    assert width.bytes_after["fp32"] / 1e6 <= size_mb * 0.9


def test_plan_json_round_trip(eight_layers):
    plan = make_plan(eight_layers, "width", ratio=0.2)
    again = Plan.from_json(json.dumps(plan.model_dump(mode="json")))
    assert again == plan and isinstance(next(iter(again.heads_kept)), int)


def test_what_if_for_shipped_configs(llava7b, monkeypatch):
    monkeypatch.setattr(whatif, "_measure_cpu", lambda: {"peak_flops": 1e11, "bandwidth": 2e10,
                                                         "overhead_per_layer_s": 1e-4, "threads": 2})
    base = what_if(llava7b, None, hardware="h100", prompt_tokens=32)
    assert 7.0e9 < base["params_total"] < 7.1e9
    assert base["visual_tokens"] == 576 and base["prefill_tokens"] == 608
    assert base["kv_cache_bytes_per_token"]["bf16"] == 32 * 2 * 4096 * 2  # 0.5 MiB per token, as published
    assert base["bytes"]["bf16"] == 2 * base["params_total"]
    assert base["bytes"]["nf4"] < base["bytes"]["int8"] < base["bytes"]["bf16"]
    assert base["prefill_flops"]["language"] > 2 * 608 * 6.5e9
    plan = make_plan(llava7b, "layer", ratio=0.3)
    pruned = what_if(llava7b, plan, hardware="h100")
    assert abs(plan.ratio_achieved - 0.3) < 0.02
    assert pruned["prefill_ms"] < base["prefill_ms"] and pruned["params_total"] == plan.params_after
    cpu = what_if(llava7b, None, hardware="cpu")
    assert cpu["hardware_profile"]["peak_flops"] == 1e11 and cpu["prefill_ms"] > base["prefill_ms"]
    for hardware in ("a100-80gb", "rtx-4090"):
        assert what_if(llava7b, None, hardware=hardware)["prefill_ms"] > base["prefill_ms"]
    bunny = models.load("config:bunny-v1.0-3b")
    b = what_if(bunny, make_plan(bunny, "width", ratio=0.3), hardware="a100-80gb")
    assert b["visual_tokens"] == 729 and b["params_language"] < 0.75 * 2.78e9
    with pytest.raises(ValueError, match="hardware 'tpu'"):
        what_if(llava7b, None, hardware="tpu")
    # visual-token pruning: the language model sees 72 + 32 tokens; the vision tower still every patch
    few = what_if(llava7b, None, hardware="h100", prompt_tokens=32, visual_tokens=72)
    assert few["prefill_tokens"] == 104 and few["prefill_flops"]["vision"] == base["prefill_flops"]["vision"]
    assert 5.5 < base["prefill_flops"]["language"] / few["prefill_flops"]["language"] < 6.5  # ~608 / 104
    with pytest.raises(ValueError, match="visual_tokens 577"):
        what_if(llava7b, None, visual_tokens=577)


def test_cpu_profile_is_measured_once_and_cached(monkeypatch):
    calls = []

    def fake():
        calls.append(1)
        return {"peak_flops": 5e10, "bandwidth": 1e10, "overhead_per_layer_s": 1e-4, "threads": 2}

    monkeypatch.setattr(whatif, "_measure_cpu", fake)
    assert whatif.cpu_profile().peak_flops == 5e10
    assert whatif.cpu_profile().peak_flops == 5e10
    assert len(calls) == 1


def test_cli_plan_on_a_config_only_model(capsys):
    from compression.cli import main as cli

    assert cli.main(["plan", "--model", "config:llava-1.5-7b", "--method", "width", "--ratio", "0.3",
                     "--hardware", "h100", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    for key in ("params_before", "params_after", "bytes_after", "heads_kept", "neurons_kept", "what_if"):
        assert key in payload
    assert payload["params_after"] < payload["params_before"]
    assert payload["what_if"]["prefill_ms"] < payload["what_if_before"]["prefill_ms"]
    assert cli.main(["plan", "--model", "config:llava-1.5-7b", "--method", "layer", "--ratio", "0.99"]) == 2
    assert "would remove all 32 layers" in capsys.readouterr().err
    assert cli.main(["plan", "--model", "config:nope", "--method", "layer", "--ratio", "0.3"]) == 2


def test_every_plan_says_what_serving_it_needs(llava7b):
    default = make_plan(llava7b, "width", ratio=0.3)  # first 3 and the last layer whole: widths differ
    assert default.servable["plain_transformers"] is False and "trust_remote_code" in default.servable["needs"]
    layers = make_plan(llava7b, "layer", ratio=0.3)
    assert layers.servable["plain_transformers"] is True
    assert layers.servable["tensor_parallel"] == {"2": True, "4": True, "8": True}  # 32 heads, 32 KV heads, 11008


@pytest.mark.parametrize("name, heads_kv_neurons", [("llava-1.5-7b", (32, 32, 11008)), ("gemma-3-4b", (8, 4, 10240)),
                                                    ("qwen2.5-vl-3b", (16, 2, 11008))])
def test_servable_width_plans_are_uniform_and_keep_tensor_parallel_sizes(name, heads_kv_neurons):
    loaded = models.load(f"config:{name}")
    before = dict.fromkeys(("2", "4", "8"), False)
    for t in before:
        before[t] = all(n % int(t) == 0 for n in heads_kv_neurons)
    plan = make_plan(loaded, "width", ratio=0.3, servable=True)
    widths = plan.widths_after
    assert len(set(zip(*widths.values()))) == 1  # every layer alike
    assert plan.servable["plain_transformers"] is True and plan.servable["tensor_parallel"] == before
    assert plan.ratio_achieved == pytest.approx(0.3, abs=0.05)
    heads = widths["num_attention_heads"][0]
    assert loaded.anatomy.hidden_size % heads == 0 and heads % widths["num_key_value_heads"][0] == 0
    with pytest.raises(ValueError, match="servable width plan prunes every layer alike"):
        make_plan(loaded, "width", ratio=0.3, servable=True, layer_range=(3, 10))


def test_neuron_multiple_from_the_cli_and_a_recipe(capsys):
    from compression.cli import main as cli
    from compression.runs.recipe import Recipe, RecipeError

    assert cli.main(["plan", "--model", "config:llava-1.5-7b", "--method", "width", "--ratio", "0.2",
                     "--neuron-multiple", "32", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert set(plan["widths_after"]["intermediate_size"][3:-1]) == {8416}
    assert cli.main(["plan", "--model", "config:llava-1.5-7b", "--method", "width", "--ratio", "0.2",
                     "--neuron-multiple", "48"]) == 2
    assert "--neuron-multiple '48': expected auto or a multiple of 32" in capsys.readouterr().err
    assert Recipe.from_dict({"prune": {"method": "width", "ratio": 0.2}}).prune.neuron_multiple == "auto"
    with pytest.raises(RecipeError, match="neuron_multiple"):
        Recipe.from_dict({"prune": {"method": "width", "ratio": 0.2, "neuron_multiple": 40}})
