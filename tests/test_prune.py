"""Surgery: every backbone, GQA shapes, KV cache after layer removal, and the save / from_pretrained round trip."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

from compression.data import shapes as data
from compression import models
from compression.methods.prune import apply_plan, load_plan, make_plan, save_pruned
from compression.models.pruned import LlavaPrunedForConditionalGeneration
from tests.tiny import LANGUAGES, VISIONS, encode, tiny_llava


def _inputs(processor, n: int = 1):
    samples = [data.generate("test", i) for i in range(n)]
    return encode(processor, [s.image for s in samples], [s.question for s in samples])


def _greedy(model, inputs, use_cache: bool = True, tokens: int = 4) -> torch.Tensor:
    # a random model may emit <image>; without a cache that token would be re-read as a placeholder
    out = model.generate(**inputs, max_new_tokens=tokens, do_sample=False, use_cache=use_cache,
                         min_new_tokens=tokens, suppress_tokens=[model.config.image_token_index])
    return out[:, inputs["input_ids"].shape[1]:]


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("vision", VISIONS)
def test_width_then_layer_prune_every_backbone(language, vision):
    model, processor, anatomy = tiny_llava(language, vision, num_key_value_heads=2)
    inputs = _inputs(processor)
    plan = make_plan((model, anatomy), "width", ratio=0.3, layer_range=(1, 3))
    model, anatomy = apply_plan(model, anatomy, plan)
    assert models.parameter_counts(model, anatomy)["total"] == plan.params_after
    assert anatomy.heads_per_layer == plan.widths_after["num_attention_heads"] == [4, 2, 2]
    inter = anatomy.intermediate_per_layer
    assert inter[0] == 96 and all(m < 96 and m % 32 == 0 for m in inter[1:])
    q = anatomy.attention_linears(anatomy.decoder_layers(model)[1])["q"]
    assert q.out_features == 2 * anatomy.head_dim
    layer_plan = make_plan((model, anatomy), "layer", ratio=0.3)
    model, anatomy = apply_plan(model, anatomy, layer_plan)
    assert anatomy.num_layers == 2 and model.config.text_config.num_hidden_layers == 2
    assert models.parameter_counts(model, anatomy)["total"] == layer_plan.params_after
    assert [layer.self_attn.layer_idx for layer in anatomy.decoder_layers(model)] == [0, 1]
    assert model(**inputs).logits.shape[:2] == inputs["input_ids"].shape
    # with stale layer_idx or num_key_value_groups, the cached run reads the wrong keys
    assert torch.equal(_greedy(model, inputs, True), _greedy(model, inputs, False))


@pytest.mark.parametrize("kv_heads", [1, 2, 4])
def test_gqa_keeps_whole_groups_with_equal_query_heads(kv_heads):
    model, processor, anatomy = tiny_llava("llama", "clip", num_key_value_heads=kv_heads, num_attention_heads=4)
    plan = make_plan((model, anatomy), "width", ratio=0.35, layer_range=(0, 3))
    group = 4 // kv_heads
    for i, heads in plan.heads_kept.items():
        kept_groups = plan.kv_heads_kept[i]
        per_group = [sum(h // group == j for h in heads) for j in kept_groups]
        assert len(set(per_group)) == 1 and sum(per_group) == len(heads)
        assert {h // group for h in heads} == set(kept_groups)
    model, anatomy = apply_plan(model, anatomy, plan)
    layer = anatomy.decoder_layers(model)[0]
    assert layer.self_attn.num_key_value_groups == len(plan.heads_kept[0]) // len(plan.kv_heads_kept[0])
    assert models.parameter_counts(model, anatomy)["total"] == plan.params_after
    inputs = _inputs(processor)
    assert torch.equal(_greedy(model, inputs, True), _greedy(model, inputs, False))


def test_sliced_weights_are_the_kept_rows_and_columns():
    model, _, anatomy = tiny_llava("qwen2", "clip", num_key_value_heads=2)  # qwen2: q/k/v biases
    layer = anatomy.decoder_layers(model)[1]
    q_before = layer.self_attn.q_proj.weight.detach().clone()
    qb_before = layer.self_attn.q_proj.bias.detach().clone()
    down_before = layer.mlp.down_proj.weight.detach().clone()
    plan = make_plan((model, anatomy), "width", ratio=0.1, layer_range=(1, 2))
    heads, neurons = plan.heads_kept[1], plan.neurons_kept[1]
    apply_plan(model, anatomy, plan)
    hd = anatomy.head_dim
    rows = [h * hd + d for h in heads for d in range(hd)]
    assert torch.equal(layer.self_attn.q_proj.weight, q_before[rows])
    assert torch.equal(layer.self_attn.q_proj.bias, qb_before[rows])
    assert torch.equal(layer.mlp.down_proj.weight, down_before[:, neurons])


def test_uniform_prune_failing_head_divisibility_becomes_llava_pruned():
    # hidden 64 with 4 MHA heads -> 3 heads: 64 % 3 != 0, which transformers' config validator rejects
    model, _, anatomy = tiny_llava("llama", "clip", num_key_value_heads=4)
    plan = make_plan((model, anatomy), "width", ratio=0.25, layer_range=(0, 3), )
    assert {len(h) for h in plan.heads_kept.values()} == {3}
    model, anatomy = apply_plan(model, anatomy, plan)
    assert isinstance(model, LlavaPrunedForConditionalGeneration)
    assert model.config.model_type == "llava_pruned"
    assert model.config.text_config.pruned_widths["num_attention_heads"] == [3, 3, 3]


def test_bad_plans_raise_one_line():
    model, _, anatomy = tiny_llava("llama", "clip", num_key_value_heads=2)
    plan = make_plan((model, anatomy), "width", ratio=0.3, layer_range=(0, 3))
    bad = plan.model_copy(update={"heads_kept": {0: [0, 1, 2]}, "kv_heads_kept": {0: [0, 1]}})
    with pytest.raises(ValueError, match="do not fill KV groups"):
        apply_plan(model, anatomy, bad)
    with pytest.raises(ValueError, match="layers_removed"):
        apply_plan(model, anatomy, plan.model_copy(update={"method": "layer", "layers_removed": [0, 1, 2]}))


ROUND_TRIP = textwrap.dedent("""
    import json, sys, torch
    from transformers import AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration
    result = {}
    for name, folder, remote in json.loads(sys.argv[1]):
        if remote:
            model = AutoModelForImageTextToText.from_pretrained(folder, trust_remote_code=True)
        else:
            model = LlavaForConditionalGeneration.from_pretrained(folder)
        model.eval()
        saved = torch.load(folder + "/expected.pt")
        inputs = saved["inputs"]
        with torch.no_grad():
            logits = model(**inputs).logits
        out = model.generate(**inputs, max_new_tokens=4, min_new_tokens=4, do_sample=False,
                             suppress_tokens=[model.config.image_token_index])
        result[name] = {
            "class": type(model).__name__,
            "max_logit_diff": float((logits - saved["logits"]).abs().max()),
            "same_generation": bool(torch.equal(out[:, inputs["input_ids"].shape[1]:], saved["generated"])),
            "params": sum(p.numel() for p in model.parameters()),
        }
    AutoProcessor.from_pretrained(json.loads(sys.argv[1])[0][1])
    result["project_imported"] = any(m == "compression" or m.startswith("compression.") for m in sys.modules)
    print(json.dumps(result))
""")


def test_round_trip_in_a_fresh_process(tmp_path):
    cases = [("uniform_llama", "llama", "clip", (0, 3)), ("nonuniform_qwen2", "qwen2", "siglip", (1, 3)),
             ("nonuniform_phi", "phi", "clip", (1, 3))]
    plans, folders = {}, []
    for name, language, vision, layer_range in cases:
        model, processor, anatomy = tiny_llava(language, vision, num_key_value_heads=2)
        plan = make_plan((model, anatomy), "width", ratio=0.3, layer_range=layer_range)
        model, anatomy = apply_plan(model, anatomy, plan)
        if name.startswith("nonuniform"):  # both surgeries: layer removal on top of non-uniform widths
            plan2 = make_plan((model, anatomy), "layer", ratio=0.25)
            model, anatomy = apply_plan(model, anatomy, plan2)
            plan = plan2
        folder = save_pruned(model, processor, tmp_path / name, plan)
        inputs = dict(_inputs(processor))
        with torch.no_grad():
            logits = model(**inputs).logits
        torch.save({"inputs": inputs, "logits": logits, "generated": _greedy(model, inputs)}, folder / "expected.pt")
        config = json.loads((folder / "config.json").read_text())
        assert config["model_type"] == ("llava" if name.startswith("uniform") else "llava_pruned")
        if name.startswith("uniform"):
            assert "auto_map" not in config and config["text_config"]["num_attention_heads"] == 2
        else:
            assert (folder / "modeling_llava_pruned.py").is_file()
            assert (folder / "configuration_llava_pruned.py").is_file()
        assert json.loads((folder / "pruning_plan.json").read_text())["params_after"] == plan.params_after
        plans[name] = plan
        folders.append([name, str(folder), not name.startswith("uniform")])
    proc = subprocess.run([sys.executable, "-c", ROUND_TRIP, json.dumps(folders)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=240, stdin=subprocess.DEVNULL,
                          env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin", "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["project_imported"] is False
    for name, plan in plans.items():
        assert result[name]["max_logit_diff"] < 1e-5, (name, result[name])
        assert result[name]["same_generation"], name
        assert result[name]["params"] == plan.params_after, name
    assert result["uniform_llama"]["class"] == "LlavaForConditionalGeneration"
    assert result["nonuniform_phi"]["class"] == "LlavaPrunedForConditionalGeneration"


def test_pruned_folder_loads_through_compression_models(tmp_path):
    model, processor, anatomy = tiny_llava("gemma", "siglip", num_key_value_heads=1)
    plan = make_plan((model, anatomy), "width", ratio=0.3, layer_range=(1, 3))
    model, anatomy = apply_plan(model, anatomy, plan)
    folder = save_pruned(model, processor, tmp_path / "g", plan)
    loaded = models.load(str(folder))
    assert loaded.anatomy.heads_per_layer == anatomy.heads_per_layer
    assert loaded.anatomy.intermediate_per_layer == anatomy.intermediate_per_layer
    assert models.parameter_counts(loaded.model, loaded.anatomy)["total"] == plan.params_after
    inputs = _inputs(processor)
    with torch.no_grad():
        assert torch.allclose(loaded.model(**inputs).logits, model(**inputs).logits, atol=1e-5)
    with pytest.raises(ValueError, match="not empty"):
        save_pruned(model, processor, folder)


def test_cli_prune_writes_a_loadable_folder_and_rejects_bad_input(tmp_path, capsys):
    from compression.cli import main as cli
    from tests.tiny import save_tiny

    source = save_tiny(tmp_path / "src", "llama", "clip", num_key_value_heads=2, layers=4)
    out = tmp_path / "out"
    assert cli.main(["prune", "--model", str(source), "--method", "layer", "--ratio", "0.25", "--scorer", "none",
                     "--out", str(out), "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["path"] == str(out) and len(payload["layers_removed"]) == 1
    loaded = models.load(str(out))
    assert loaded.anatomy.num_layers == 3
    assert models.parameter_counts(loaded.model, loaded.anatomy)["total"] == payload["params_after"]
    # width, non-uniform, from a model read by from_pretrained (which remembers legacy key names)
    wide = tmp_path / "wide"
    assert cli.main(["prune", "--model", str(source), "--method", "width", "--ratio", "0.2", "--layer-range", "1:4",
                     "--scorer", "magnitude", "--out", str(wide)]) == 0
    plan = load_plan(wide / "pruning_plan.json")
    reference = models.load(str(source))
    expected, _ = apply_plan(reference.model, reference.anatomy, plan)
    reloaded = models.load(str(wide))
    assert reloaded.model.config.model_type == "llava_pruned"
    inputs = _inputs(reference.processor)
    with torch.no_grad():
        assert torch.allclose(reloaded.model(**inputs).logits, expected(**inputs).logits, atol=1e-5)
    capsys.readouterr()
    for argv in (["--ratio", "1.5"], ["--ratio", "0.3", "--target-mb", "1"], [],
                 ["--ratio", "0.3", "--layer-range", "x"], ["--ratio", "0.99"]):
        code = cli.main(["prune", "--model", str(source), "--method", "layer", "--scorer", "none",
                         "--out", str(tmp_path / "bad"), *argv])
        err = capsys.readouterr().err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert code == 2 and len(errors) == 1 and "Traceback" not in err, (argv, err)
    assert cli.main(["prune", "--model", str(tmp_path / "missing"), "--method", "layer", "--ratio", "0.3",
                     "--out", str(tmp_path / "bad")]) == 2
    assert not (tmp_path / "bad").exists()
