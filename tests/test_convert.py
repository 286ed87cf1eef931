"""``convert``: original LLaVA and Bunny checkpoints -> llava-hf folders that reproduce their twins.

Each test model starts as a tiny random llava-hf model (the *twin*). Its weights are written OUT in the original
layout — haotian-liu/LLaVA's ``LlavaLlamaForCausalLM`` (``model.layers``, ``model.mm_projector.0/.2``, the CLIP tower
apart, in its own folder, as LLaVA-1.5 ships) or BAAI-DCAI/Bunny's ``bunny-phi`` (Phi under ``model.``, the SigLIP
tower under ``model.vision_tower.vision_tower.vision_model``) — with the original flat config and tokenizer, no
``<image>`` token. Converting it back must reproduce the twin's logits (atol 1e-5) and greedy tokens; the only rows
that differ are the new token rows the conversion draws, which are checked on their own and then copied into the
twin for the comparison.
"""
import functools
import json
import math
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from compression.cli.main import main
from compression.models import convert as convert_module
from compression.models import load
from compression.models.convert import ConversionError, convert
from tests.tiny import encode, write_llava_dataset

WORDS = "what colour is the square circle how many shapes are there in picture red blue USER ASSISTANT".split()
IMAGE, PATCH = 56, 14   # 16 patches: the real patch size, a small image


@pytest.fixture(autouse=True)
def _one_thread_no_hub(monkeypatch, one_thread):
    # the machine's hub cache must not decide a test: towers come from --vision-tower or the checkpoint
    monkeypatch.setattr(convert_module, "_local_snapshot", lambda name: None)


# ----------------------------------------------------------------------------------------- original tokenizers

def llama_tokenizer():
    """A Llama (SentencePiece-style BPE, byte fallback) tokenizer as LLaVA-1.5 ships it: pad = unk, no <image>."""
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    for ch in sorted(set("".join(WORDS)) | {"▁", ":", "?", "\n"}):
        vocab.setdefault(ch, len(vocab))
    for w in WORDS:
        for i in range(2, len(w) + 2):
            vocab.setdefault(("▁" + w)[:i], len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", pad_token="<unk>", add_bos_token=True)


def phi_tokenizer():
    """A byte-level BPE with ``<|endoftext|>`` as bos / eos / unk and no pad, as Phi-2's (Bunny's) is."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=2048)


# ----------------------------------------------------------------------------------------- twins, written out

def _twin(text, vision, image_token_index: int, feature_layer: int, strategy: str, seed: int):
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    patches = (IMAGE // PATCH) ** 2
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=image_token_index,
                         image_seq_length=patches, vision_feature_layer=feature_layer,
                         vision_feature_select_strategy=strategy, projector_hidden_act="gelu", tie_word_embeddings=False)
    torch.manual_seed(seed)
    return LlavaForConditionalGeneration(config).eval()


def _original_keys(twin) -> tuple[dict, dict]:
    """The twin's tensors under the original names: ``(language model + projector, tower keys as vision_model.*)``."""
    main_part, tower = {}, {}
    for key, tensor in twin.state_dict().items():
        tensor = tensor.clone()
        if key.startswith("model.language_model."):
            main_part["model." + key[len("model.language_model."):]] = tensor
        elif key.startswith("model.multi_modal_projector.linear_"):
            index = {"1": "0", "2": "2"}[key[len("model.multi_modal_projector.linear_")]]
            main_part[f"model.mm_projector.{index}." + key.rsplit(".", 1)[1]] = tensor
        elif key.startswith("model.vision_tower."):
            tower["vision_model." + key[len("model.vision_tower."):]] = tensor
        else:
            assert key == "lm_head.weight", key
            main_part[key] = tensor
    return main_part, tower


def _flat_text_config(text, **overrides) -> dict:
    """The language model's fields as an original (transformers 4) config.json writes them."""
    d = {k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures", "rope_parameters",
                                                                "transformers_version", "dtype", "_name_or_path")}
    d["rope_theta"] = text.rope_parameters["rope_theta"]
    if "partial_rotary_factor" in text.rope_parameters:
        d["partial_rotary_factor"] = text.rope_parameters["partial_rotary_factor"]
    return {**d, **overrides}


def write_llava_original(root: Path, seed: int = 0):
    """``(twin, checkpoint folder, CLIP folder)``: LLaVA-1.5's layout, two ``.bin`` shards, the tower apart."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPTextConfig, CLIPVisionConfig, LlamaConfig

    tokenizer = llama_tokenizer()
    vocab = len(tokenizer)
    rows = math.ceil((vocab + 2) / 64) * 64     # what the conversion must give: <image>, <pad>, padding to 64
    text = LlamaConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=4, head_dim=16, max_position_embeddings=256,
                       bos_token_id=1, eos_token_id=2, pad_token_id=vocab + 1, tie_word_embeddings=False)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, projection_dim=16)
    twin = _twin(text, vision, vocab, -2, "default", seed)
    weights, tower = _original_keys(twin)
    weights["model.embed_tokens.weight"] = weights["model.embed_tokens.weight"][:vocab].clone()
    weights["lm_head.weight"] = weights["lm_head.weight"][:vocab].clone()
    weights["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)   # old checkpoints saved it
    ckpt = root / "llava-v1.5-tiny"
    ckpt.mkdir(parents=True)
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava",
              **_flat_text_config(text, vocab_size=vocab, pad_token_id=0),
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
              "mm_patch_merge_type": "flat", "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right",
              "tune_mm_mlp_adapter": False, "freeze_mm_mlp_adapter": False, "use_mm_proj": True,
              "torch_dtype": "float32"}
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    keys = sorted(weights)
    halves = {"pytorch_model-00001-of-00002.bin": keys[: len(keys) // 2],
              "pytorch_model-00002-of-00002.bin": keys[len(keys) // 2:]}
    for name, part in halves.items():
        torch.save({k: weights[k] for k in part}, ckpt / name)
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: name for name, part in halves.items() for k in part}}))
    tokenizer.save_pretrained(ckpt)

    clip = root / "clip-vit-tiny-patch14"   # openai/clip-vit-large-patch14-336's layout: a whole CLIPModel
    clip.mkdir()
    clip_config = CLIPConfig(text_config=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                        num_attention_heads=2, vocab_size=50, bos_token_id=0,
                                                        eos_token_id=1, pad_token_id=1).to_dict(),
                             vision_config=vision.to_dict(), projection_dim=16)
    clip_config.save_pretrained(clip)
    save_file({**tower, "text_model.embeddings.token_embedding.weight": torch.zeros(50, 16),
               "visual_projection.weight": torch.zeros(16, 32), "logit_scale": torch.tensor(2.6)},
              str(clip / "model.safetensors"))
    CLIPImageProcessor(size={"shortest_edge": IMAGE}, crop_size={"height": IMAGE, "width": IMAGE}).save_pretrained(clip)
    return twin, ckpt, clip


def write_bunny_original(root: Path, layout: str = "current", seed: int = 1):
    """``(twin, checkpoint folder, SigLIP folder)``: bunny-phi with the tower in the checkpoint.

    ``layout`` ``current``: the whole tower (one more layer than the twin uses, and the pooling head), as today's
    Bunny saves it and takes ``hidden_states[-2]``; ``first-release``: the last layer already deleted (``[-1]``).
    The SigLIP folder supplies the config only; its own weights are different and must not be used.
    """
    from transformers import PhiConfig, SiglipImageProcessor, SiglipVisionConfig

    tokenizer = phi_tokenizer()
    vocab = len(tokenizer)
    rows = vocab + 40   # Phi pads its embedding matrix (51200 rows for 50295 tokens): room for the new tokens
    text = PhiConfig(vocab_size=rows, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=4, partial_rotary_factor=0.5,
                     max_position_embeddings=256, bos_token_id=0, eos_token_id=0, tie_word_embeddings=False)
    used = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                              image_size=IMAGE, patch_size=PATCH, vision_use_head=False)
    twin = _twin(text, used, vocab, -1, "full", seed)
    weights, tower = _original_keys(twin)
    if layout == "current":
        generator = torch.Generator().manual_seed(7)
        for key in [k for k in tower if k.startswith("vision_model.encoder.layers.1.")]:
            tower[key.replace("layers.1.", "layers.2.")] = torch.randn(tower[key].shape, generator=generator)
        tower["vision_model.head.probe"] = torch.randn(1, 1, 32, generator=generator)
        tower["vision_model.head.layernorm.weight"] = torch.ones(32)
    weights.update({"model.vision_tower.vision_tower." + k: v for k, v in tower.items()})
    ckpt = root / f"bunny-phi-tiny-{layout}"
    ckpt.mkdir(parents=True)
    config = {"architectures": ["BunnyPhiForCausalLM"], "model_type": "bunny-phi", **_flat_text_config(text),
              "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 32,
              "mm_projector_type": "mlp2x_gelu", "image_aspect_ratio": "pad", "use_mm_proj": True,
              "tokenizer_model_max_length": 2048, "tokenizer_padding_side": "right", "tune_mm_mlp_adapter": False,
              "unfreeze_vision_tower": layout == "current", "use_s2": False, "torch_dtype": "float32"}
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    keys = sorted(weights)
    for i, part in enumerate((keys[: len(keys) // 2], keys[len(keys) // 2:])):
        save_file({k: weights[k] for k in part}, str(ckpt / f"model-0000{i + 1}-of-00002.safetensors"))
    tokenizer.save_pretrained(ckpt)

    siglip = root / f"siglip-tiny-{layout}"   # google/siglip-so400m-patch14-384 as a config: 3 layers, the head
    full = SiglipVisionConfig(**{**used.to_dict(), "num_hidden_layers": 3, "vision_use_head": True})
    full.save_pretrained(siglip)
    save_file({k: torch.zeros_like(v) for k, v in tower.items()}, str(siglip / "model.safetensors"))
    SiglipImageProcessor(size={"height": IMAGE, "width": IMAGE}).save_pretrained(siglip)
    return twin, ckpt, siglip


# ----------------------------------------------------------------------------------------- the comparison

def _images():
    return [Image.new("RGB", (70, 40), (200, 30, 30)), Image.new("RGB", (30, 60), (20, 60, 220))]


def assert_reproduces_twin(twin, folder: Path, report) -> None:
    """Logits within 1e-5 and the same greedy tokens on the same inputs (new token rows taken from the conversion)."""
    loaded = load(str(folder))
    converted = loaded.model
    start, stop = report.initialised_rows
    assert converted.config.text_config.vocab_size == twin.config.text_config.vocab_size
    with torch.no_grad():
        for name in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            twin.get_parameter(name)[start:stop] = converted.get_parameter(name)[start:stop]
    inputs = encode(loaded.processor, _images(), ["what colour is the square?", "how many shapes are there?"])
    assert (inputs["input_ids"] == report.image_token_index).sum(1).tolist() == [16, 16]
    with torch.no_grad():
        expected, got = twin(**inputs).logits, converted(**inputs).logits
    real = inputs["attention_mask"].bool()
    difference = (expected[real] - got[real]).abs().max().item()
    assert difference <= 1e-5, difference
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=report.pad_token_id)
    with torch.no_grad():
        assert torch.equal(twin.generate(**inputs, **kwargs), converted.generate(**inputs, **kwargs))


def assert_new_rows_from_the_old_rows(folder: Path, original_embed: torch.Tensor, report) -> None:
    """The new rows sit at the old rows' mean, their spread sqrt(1e-5) of the old rows' (the public script's init)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    files = json.loads(index.read_text())["weight_map"] if index.is_file() else None
    key = "model.language_model.embed_tokens.weight"
    name = files[key] if files else "model.safetensors"
    with safe_open(str(folder / name), "pt") as f:
        embed = f.get_tensor(key)
    start, stop = report.initialised_rows
    old = original_embed.float()
    mean, spread = old.mean(0), old.std(0).mean()
    new = embed[start:stop].float()
    assert (new.mean(0) - mean).abs().max() < 0.1 * spread
    assert 0.1 * math.sqrt(1e-5) * spread < new.std(0).mean() < 10 * math.sqrt(1e-5) * spread
    assert torch.equal(embed[:start], original_embed[:start])


# ----------------------------------------------------------------------------------------- LLaVA

@pytest.fixture(scope="module")
def llava(tmp_path_factory):
    root = tmp_path_factory.mktemp("llava")
    twin, ckpt, clip = write_llava_original(root)
    return {"root": root, "twin": twin, "ckpt": ckpt, "clip": clip}


def test_llava_checkpoint_converts_to_its_llava_hf_twin(llava, capsys):
    out = llava["root"] / "llava-hf"
    assert main(["convert", str(llava["ckpt"]), "--to", str(out), "--vision-tower", str(llava["clip"]), "--json"]) == 0
    report = convert_module.ConversionReport(**json.loads(capsys.readouterr().out))
    vocab = len(llama_tokenizer())
    # transformers' convert_llava_weights_to_hf: <image> then <pad> after the vocabulary, rows padded to 64
    assert (report.image_token_index, report.pad_token_id) == (vocab, vocab + 1)
    assert (report.vocab_rows_before, report.vocab_rows_after) == (vocab, math.ceil((vocab + 2) / 64) * 64)
    assert report.initialised_rows == [vocab, report.vocab_rows_after]
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlavaForConditionalGeneration"] and config["model_type"] == "llava"
    assert config["vision_feature_layer"] == -2 and config["vision_feature_select_strategy"] == "default"
    assert config["image_token_index"] == vocab and config["text_config"]["model_type"] == "llama"
    assert config["vision_config"]["num_hidden_layers"] == 3 and config["image_seq_length"] == 16
    processor = json.loads((out / "processor_config.json").read_text())
    assert processor["image_processor"]["do_pad"] is True   # image_aspect_ratio "pad"
    processor = load(str(out)).processor
    assert processor.chat_template == convert_module.LLAVA_HF_CHAT_TEMPLATE
    tokenizer = processor.tokenizer
    assert tokenizer.convert_ids_to_tokens([vocab, vocab + 1]) == ["<image>", "<pad>"] and tokenizer.pad_token == "<pad>"
    assert tokenizer("USER: what").input_ids[:1] == [1]   # the checkpoint's own Llama tokenizer, bos and all
    embed = torch.load(llava["ckpt"] / "pytorch_model-00001-of-00002.bin")["model.embed_tokens.weight"]
    assert_new_rows_from_the_old_rows(out, embed, report)
    assert_reproduces_twin(llava["twin"], out, report)


def test_llava_loaded_model_answers_with_the_llava_hf_prompt(llava):
    out = llava["root"] / "llava-hf-prompt"
    convert(llava["ckpt"], out, vision_tower=llava["clip"])
    loaded = load(str(out))
    from compression.data.records import single_turn

    assert loaded.prompt.uses_chat_template and loaded.anatomy.visual_tokens == 16
    assert loaded.prompt.render(single_turn("what is it?"), add_generation_prompt=True) == \
        "USER: <image>\nwhat is it? ASSISTANT:"


# ----------------------------------------------------------------------------------------- Bunny

@pytest.mark.parametrize("layout", ["current", "first-release"])
def test_bunny_checkpoint_converts_to_its_llava_hf_twin(tmp_path, layout):
    twin, ckpt, siglip = write_bunny_original(tmp_path, layout)
    out = tmp_path / "bunny-hf"
    report = convert(ckpt, out, vision_tower=siglip, max_shard_bytes=200_000)
    vocab = len(phi_tokenizer())
    assert (report.image_token_index, report.pad_token_id) == (vocab, vocab + 1)
    assert report.vocab_rows_before == report.vocab_rows_after == vocab + 40   # Phi's padding rows suffice
    assert report.initialised_rows == [vocab, vocab + 2] and report.shards > 1
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["model_type"] == "phi" and config["vision_config"]["model_type"] == "siglip_vision_model"
    # Bunny's hidden_states[-2] of the 3-layer tower = the output of a 2-layer tower, all of its tokens
    assert config["vision_config"]["num_hidden_layers"] == 2 and config["vision_feature_layer"] == -1
    assert config["vision_feature_select_strategy"] == "full" and config["vision_config"]["vision_use_head"] is False
    assert config["projector_hidden_act"] == "gelu"
    assert report.vision_tower_from == f"{ckpt} (config: {siglip})"   # the checkpoint's weights, not the folder's
    loaded = load(str(out))
    from compression.data.records import single_turn

    text = loaded.prompt.render(single_turn("what is it?"), add_generation_prompt=True)
    assert text == convert_module.BUNNY_SYSTEM + " USER: <image>\nwhat is it? ASSISTANT:"
    assert_reproduces_twin(twin, out, report)


# ----------------------------------------------------------------------------------------- like any llava-hf folder

@pytest.mark.parametrize("source", ["llava", "bunny"])
def test_converted_model_goes_through_importance_prune_and_export(tmp_path, monkeypatch, source):
    from compression.measure import evaluate
    from compression.runs import export, pipeline
    from compression.runs.recipe import Recipe

    monkeypatch.setattr(evaluate, "latency", functools.partial(evaluate.latency, repeats=1, warmup=0, decode_tokens=2))
    if source == "llava":
        _, ckpt, tower = write_llava_original(tmp_path)
    else:
        _, ckpt, tower = write_bunny_original(tmp_path)
    folder = tmp_path / "converted"
    convert(ckpt, folder, vision_tower=tower)
    data = write_llava_dataset(tmp_path / "data", n=4)
    recipe = Recipe.from_dict({"name": f"converted-{source}", "model": str(folder),
                               "prune": {"method": "width", "ratio": 0.3, "layer_range": [0, 2]},
                               "data": {"calibration": {"source": str(data), "samples": 2},
                                        "eval": {"source": str(data), "samples": 2}}})
    metrics = pipeline.run_recipe(recipe, tmp_path / "run")
    assert metrics["compressed"]["params_total"] < metrics["original"]["params_total"]
    assert metrics["prompt"] == "the model's chat template"
    # the fresh-process reload check costs a Python start; Llama + CLIP exports are checked so in test_export
    exported = export.export_run(tmp_path / "run", tmp_path / "export", make_zip=False, verify=source == "bunny")
    reloaded = load(str(exported))
    assert reloaded.anatomy.intermediate_size < json.loads((folder / "config.json").read_text())[
        "text_config"]["intermediate_size"]


# ----------------------------------------------------------------------------------------- bad input

def _run(argv, capsys) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, (code, err)
    return err


def _nothing_left(parent: Path, name: str) -> None:
    assert not (parent / name).exists()
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_llava_without_a_vision_tower_is_refused_naming_it(llava, capsys):
    err = _run(["convert", str(llava["ckpt"]), "--to", str(llava["root"] / "no-tower")], capsys)
    assert "holds no vision tower weights" in err and "openai/clip-vit-large-patch14-336" in err
    assert "--vision-tower" in err
    _nothing_left(llava["root"], "no-tower")
    err = _run(["convert", str(llava["ckpt"]), "--to", str(llava["root"] / "no-tower"), "--vision-tower",
                str(llava["root"] / "missing")], capsys)
    assert "is not a folder with config.json" in err


def test_unrecognised_formats_are_refused(llava, tmp_path, capsys):
    from tests.tiny import save_tiny

    hf = save_tiny(tmp_path / "already-hf", layers=1)
    assert "already a llava-hf config" in _run(["convert", str(hf), "--to", str(tmp_path / "x")], capsys)
    other = tmp_path / "bert"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    err = _run(["convert", str(other), "--to", str(tmp_path / "x")], capsys)
    assert "'bert'" in err and "LlavaLlamaForCausalLM" in err and "bunny-phi" in err
    assert "has no config.json" in _run(["convert", str(tmp_path), "--to", str(tmp_path / "x")], capsys)
    _nothing_left(tmp_path, "x")


def _copy(src: Path, dst: Path, edit=None, drop=()) -> Path:
    import shutil

    shutil.copytree(src, dst)
    for name in drop:
        (dst / name).unlink()
    if edit:
        config = json.loads((dst / "config.json").read_text())
        edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def test_missing_tokenizer_and_unconvertible_fields_are_refused(llava, tmp_path, capsys):
    clip = str(llava["clip"])
    bare = _copy(llava["ckpt"], tmp_path / "no-tokenizer", drop=("tokenizer.json", "tokenizer_config.json"))
    assert "has no tokenizer" in _run(["convert", str(bare), "--to", str(tmp_path / "x"), "--vision-tower", clip],
                                      capsys)
    for field, value, words in [("mm_projector_type", "linear", "mm_projector_type 'linear'"),
                                ("mm_use_im_start_end", True, "mm_use_im_start_end is true"),
                                ("image_aspect_ratio", "anyres", "LLaVA-NeXT")]:
        bad = _copy(llava["ckpt"], tmp_path / field, edit=lambda c: c.update({field: value}))
        assert words in _run(["convert", str(bad), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    _nothing_left(tmp_path, "x")


def test_configs_that_disagree_with_the_weights_are_refused(llava, tmp_path, capsys):
    clip = str(llava["clip"])
    wide = _copy(llava["ckpt"], tmp_path / "wide", edit=lambda c: c.update(intermediate_size=96))
    err = _run(["convert", str(wide), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    assert "model.layers.0.mlp.down_proj.weight is [64, 128]" in err or "is [128, 64]" in err
    assert "the config disagrees with the weights" in err
    vocab = _copy(llava["ckpt"], tmp_path / "vocab", edit=lambda c: c.update(vocab_size=1000))
    err = _run(["convert", str(vocab), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    assert "vocab_size 1000" in err and "rows" in err
    hidden = _copy(llava["ckpt"], tmp_path / "mm-hidden", edit=lambda c: c.update(mm_hidden_size=48))
    err = _run(["convert", str(hidden), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    assert "mm_hidden_size 48" in err
    _nothing_left(tmp_path, "x")


def test_truncated_and_missing_shards_are_refused(llava, tmp_path, capsys):
    clip = str(llava["clip"])
    cut = _copy(llava["ckpt"], tmp_path / "truncated")
    shard = cut / "pytorch_model-00002-of-00002.bin"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    err = _run(["convert", str(cut), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    assert "pytorch_model-00002-of-00002.bin cannot be read" in err
    gone = _copy(llava["ckpt"], tmp_path / "missing", drop=("pytorch_model-00001-of-00002.bin",))
    err = _run(["convert", str(gone), "--to", str(tmp_path / "x"), "--vision-tower", clip], capsys)
    assert "names shard pytorch_model-00001-of-00002.bin, which is not in" in err
    _nothing_left(tmp_path, "x")


def test_bunny_tower_config_from_the_public_facts_is_checked_against_the_weights(tmp_path, capsys):
    _, ckpt, _ = write_bunny_original(tmp_path)
    # no --vision-tower: google/siglip-so400m-patch14-384's public config (27 layers) meets 3 tiny layers
    err = _run(["convert", str(ckpt), "--to", str(tmp_path / "x")], capsys)
    assert "hold 3 layers" in err and "27" in err
    _nothing_left(tmp_path, "x")


def test_nothing_half_written_when_writing_fails(llava, tmp_path, monkeypatch):
    import safetensors.torch

    calls = []

    def fail_on_second(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise OSError("disk full")
        return real(tensors, filename, metadata=metadata)

    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", fail_on_second)
    with pytest.raises(OSError, match="disk full"):
        convert(llava["ckpt"], tmp_path / "out", vision_tower=llava["clip"], max_shard_bytes=100_000)
    _nothing_left(tmp_path, "out")
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("mine")
    with pytest.raises(ConversionError, match="already exists"):
        convert(llava["ckpt"], tmp_path / "taken", vision_tower=llava["clip"])
    assert (tmp_path / "taken" / "file").read_text() == "mine"
