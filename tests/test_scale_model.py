"""benchmarks/scale_model.py: the folder it writes is a real LLaVA checkpoint (shrunk dimensions, same structure)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open

from compression import models
from tests.tiny import tiny_llava

SPEC = importlib.util.spec_from_file_location(
    "scale_model", Path(__file__).resolve().parent.parent / "benchmarks" / "scale_model.py")
scale_model = importlib.util.module_from_spec(SPEC)
sys.modules.setdefault("scale_model", scale_model)  # dataclasses look their module up there
SPEC.loader.exec_module(scale_model)

SHRINK = {"text_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                          "num_key_value_heads": 4},
          "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                            "num_attention_heads": 2, "image_size": 28, "patch_size": 14}}


def test_key_names_are_what_save_pretrained_writes(tmp_path):
    model, processor, _ = tiny_llava("llama", "clip", num_key_value_heads=2)
    model.save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as f:
        saved = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    config = scale_model.config_dict(3, kv_heads=2, shrink={
        "text_config": {"hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 4,
                        "vocab_size": model.config.text_config.vocab_size},
        "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                          "num_attention_heads": 2, "image_size": 32, "patch_size": 16}})
    assert {s.name: s.shape for s in scale_model.tensor_specs(config)} == saved


def test_sharded_folder_loads_with_the_studio_and_plain_transformers(tmp_path):
    from transformers import LlavaForConditionalGeneration

    folder = scale_model.write_scale_model(tmp_path / "m", layers=2, shrink=SHRINK, shard_bytes=4_000_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and all((folder / s).is_file() for s in shards)  # the 32064 x 64 embeddings alone are 8 MB
    assert index["metadata"]["total_size"] == sum((folder / s).stat().st_size for s in shards) - sum(
        8 + int.from_bytes((folder / s).read_bytes()[:8], "little") for s in shards)  # file = header + tensors
    loaded = models.load(str(folder))
    assert loaded.anatomy.visual_tokens == 4 and loaded.anatomy.vocab_size == 32064
    assert loaded.anatomy.num_layers == 2 and loaded.anatomy.head_dim == 16
    plain = LlavaForConditionalGeneration.from_pretrained(folder)
    state = plain.state_dict()
    layer = loaded.model.model.language_model.layers[1]
    assert torch.equal(layer.mlp.up_proj.weight, state["model.language_model.layers.1.mlp.up_proj.weight"])
    assert float(layer.input_layernorm.weight.detach().min()) == 1.0
    assert 0.015 < float(layer.mlp.up_proj.weight.detach().std()) < 0.025
    tok = loaded.processor.tokenizer
    assert len(tok) == 32064 and tok.convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it ?"}]}]
    prompt = loaded.processor.apply_chat_template(messages, add_generation_prompt=True)
    assert prompt == "USER: <image>\nwhat color is it ? ASSISTANT:"
    from PIL import Image

    inputs = loaded.processor(images=[Image.new("RGB", (50, 40), (200, 0, 0))], text=[prompt], return_tensors="pt")
    assert int((inputs["input_ids"] == 32000).sum()) == 4 and inputs["pixel_values"].shape[-1] == 28
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert logits.shape[-1] == 32064 and torch.isfinite(logits).all()
