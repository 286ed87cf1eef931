"""The one loader and the anatomy: every supported backbone, GQA layouts, shipped configs, bad sources."""
import json

import pytest
import torch

from compression import models
from tests.tiny import LANGUAGES, VISIONS, save_tiny, tiny_config, tiny_llava


@pytest.mark.parametrize("language", LANGUAGES)
@pytest.mark.parametrize("vision", VISIONS)
@pytest.mark.parametrize("kv", [1, 2, 4])
def test_anatomy_finds_every_part(language, vision, kv):
    model, _, anatomy = tiny_llava(language, vision, num_key_value_heads=kv)
    layers = anatomy.decoder_layers(model)
    assert len(layers) == anatomy.num_layers == 3
    assert (anatomy.num_attention_heads, anatomy.num_key_value_heads, anatomy.head_dim) == (4, kv, 16)
    assert anatomy.gqa_group_size == 4 // kv
    attn = anatomy.attention_linears(layers[1])
    assert attn["q"].out_features == 4 * 16 and attn["k"].out_features == kv * 16 == attn["v"].out_features
    assert attn["o"].in_features == 64 and attn["o"].out_features == 64
    mlp = anatomy.mlp_linears(layers[1])
    assert mlp["up"].out_features == 96 == mlp["down"].in_features
    assert ("gate" in mlp) == (language != "phi")
    assert anatomy.visual_tokens == 4  # 32x32 image, patch 16; CLIP's CLS token dropped, SigLIP has none
    counts = models.parameter_counts(model, anatomy)
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["vision"] == sum(p.numel() for p in model.model.vision_tower.parameters())
    assert counts["vision"] + counts["projector"] + counts["language"] == counts["total"]


def test_phi_names_its_projections_like_phi():
    _, _, anatomy = tiny_llava("phi", "siglip")
    assert (anatomy.o_proj, anatomy.gate_proj, anatomy.up_proj, anatomy.down_proj) == ("dense", None, "fc1", "fc2")


# Published sizes: the parameter count each model's Hugging Face page shows (safetensors metadata), as recorded in
# /work/notes/families-research.md section 7; Bunny-v1.0-3B: its model card ("3B", 3.2B in its safetensors).
# Visual tokens: per image for fixed-count families, per 448-px image or per tile for variable ones.
PUBLISHED = [
    ("llava-1.5-7b", "llava-hf/llava-1.5-7b-hf", 7.06e9, 576),
    ("llava-1.5-13b", "llava-hf/llava-1.5-13b-hf", 13.35e9, 576),
    ("bunny-v1.0-3b", "BAAI/Bunny-v1_0-3B", 3.2e9, 729),
    ("qwen2.5-vl-3b", "Qwen/Qwen2.5-VL-3B-Instruct", 3.75e9, 256),
    ("qwen2.5-vl-7b", "Qwen/Qwen2.5-VL-7B-Instruct", 8.29e9, 256),
    ("qwen3-vl-8b", "Qwen/Qwen3-VL-8B-Instruct", 8.77e9, 196),
    ("gemma-3-4b", "google/gemma-3-4b-it", 4.30e9, 256),
    ("internvl3-2b", "OpenGVLab/InternVL3-2B-hf", 2.09e9, 256),
    ("internvl3-8b", "OpenGVLab/InternVL3-8B-hf", 7.94e9, 256),
    ("smolvlm-256m", "HuggingFaceTB/SmolVLM-256M-Instruct", 0.256e9, 64),
    ("smolvlm-2b", "HuggingFaceTB/SmolVLM-Instruct", 2.25e9, 81),
    ("mini-internvl-chat-4b-v1-5", "OpenGVLab/Mini-InternVL-Chat-4B-V1-5", 4.15e9, 256),
]


@pytest.mark.parametrize("name, hub_id, published, tokens", PUBLISHED)
def test_shipped_configs_match_published_sizes(name, hub_id, published, tokens):
    loaded = models.load(f"config:{name}")
    assert not loaded.has_weights and loaded.processor is None
    assert next(loaded.model.parameters()).device.type == "meta"
    total = models.parameter_counts(loaded.model, loaded.anatomy)["total"]
    assert abs(total - published) / published < 0.01, f"{hub_id}: {total:,} vs published {published:,.0f}"
    assert loaded.anatomy.visual_tokens == tokens


def test_every_shipped_config_has_a_published_size():
    assert set(models.shipped_configs()) == {name for name, *_ in PUBLISHED}


def test_llava_7b_anatomy_from_config():
    a = models.load("config:llava-1.5-7b").anatomy
    assert (a.num_layers, a.hidden_size, a.num_attention_heads, a.num_key_value_heads, a.head_dim,
            a.intermediate_size) == (32, 4096, 32, 32, 128, 11008)


def test_local_folder_round_trip(tmp_path):
    folder = save_tiny(tmp_path / "m", "qwen2", "clip", num_key_value_heads=2)
    loaded = models.load(str(folder))
    assert loaded.kind == "local" and loaded.has_weights
    assert loaded.anatomy.language_model_type == "qwen2"
    reference, _, _ = tiny_llava("qwen2", "clip", num_key_value_heads=2)
    for (n, p), (_, q) in zip(loaded.model.state_dict().items(), reference.state_dict().items()):
        assert torch.equal(p, q), n
    assert loaded.fingerprint == models.load(str(folder)).fingerprint


def test_config_json_alone_is_what_if_only(tmp_path):
    tiny_config("llama").save_pretrained(tmp_path)
    for source in (str(tmp_path), str(tmp_path / "config.json")):
        loaded = models.load(source)
        assert loaded.kind == "config" and not loaded.has_weights


def test_bad_sources_get_one_line(tmp_path):
    cases = {
        str(tmp_path / "missing"): "model folder .*missing does not exist",
        str(tmp_path): "has no config.json",
        "config:gpt-7": "no shipped config 'gpt-7'",
        "nobody/nothing": r"not in the local Hugging Face cache .*HF_HUB_OFFLINE",
    }
    for source, message in cases.items():
        with pytest.raises(models.ModelLoadError, match=message) as err:
            models.load(source)
        assert "\n" not in str(err.value)


def test_unsupported_architectures_are_named(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "blip-2"}))
    with pytest.raises(models.ModelLoadError, match="unsupported architecture 'blip-2'; supported: LLaVA"):
        models.load(str(tmp_path))
    config = tiny_config("llama").to_dict()
    config["text_config"]["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(models.ModelLoadError, match="language model 'gpt2'; supported: llama, mistral, qwen2, phi, gemma"):
        models.load(str(tmp_path))
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(models.ModelLoadError, match="is not valid JSON"):
        models.load(str(tmp_path))


def test_available_models_lists_reference_and_configs():
    rows = models.available_models()
    names = {r["name"]: r for r in rows}
    assert names["reference"]["kind"] == "reference"
    assert {"config:llava-1.5-7b", "config:bunny-v1.0-3b"} <= set(names)
