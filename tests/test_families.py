"""Every family end to end on a tiny random model: load -> importance -> layer prune -> width prune ->
recovery -> save -> reload in a fresh process with plain transformers (logits within 1e-4, same greedy answer).

Data goes through the one data path (``compression.data.sources``) from a LLaVA-format JSON file and is
prompted with the family's chat template (``compression.models.prompting``).
"""
import pytest
import torch

from compression import models
from compression.methods import importance, prune, recover
from compression.models import families
from compression.runs import export
from tests.families import BUILDERS, LAYERS
from tests.tiny import write_llava_dataset

# projector recovery trains the family's projector / merger; lora adds adapters on the decoder (merged after)
RECOVERY = {"llava": "projector", "llava_next": "lora", "llava_onevision": "projector", "gemma3": "lora",
            "paligemma": "projector", "idefics3": "lora", "smolvlm": "projector", "qwen2_vl": "projector",
            "qwen2_5_vl": "lora", "qwen3_vl": "projector", "internvl": "lora", "mistral3": "projector"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_llava_dataset(tmp_path_factory.mktemp("data"), n=6)


def _vision_only(model, anatomy) -> dict[str, torch.Tensor]:
    """The vision tower's weights that are not the projector's (Qwen's merger sits inside the tower)."""
    projector = {id(p) for p in anatomy.projector_parameters(model)}
    return {n: p.detach().clone() for n, p in model.get_submodule(anatomy.vision_tower).named_parameters()
            if id(p) not in projector}


def _logits(loaded, batch) -> torch.Tensor:
    with torch.no_grad():
        return loaded.model(**{k: v for k, v in batch.items() if k != "labels"}).logits


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_analyze_prune_recover_export(name, tmp_path, data):
    folder = BUILDERS[name](tmp_path / "model")
    loaded = models.load(str(folder))
    anatomy, family = loaded.anatomy, families.family_for(name)
    assert anatomy.family == family.name and anatomy.num_layers == LAYERS
    assert loaded.prompt.uses_chat_template == (family.token_types != "prefix")

    selection = importance.calibration_selection({"path": str(data)}, n=4)
    batches = importance.calibration_batches(loaded.prompt, selection.records, batch_size=2)
    for batch in batches:  # visual tokens where the description says, the answer supervised
        per_row = (batch["input_ids"] == anatomy.image_token_index).sum(1)
        assert bool((per_row > 0).all())
        if anatomy.visual_tokens_fixed:
            assert per_row.tolist() == [anatomy.visual_tokens] * len(per_row)
        assert int((batch["labels"] != -100).sum()) >= len(per_row)
        assert set(family.forward_kwargs) <= set(batch)

    layers = importance.layer_importance(loaded, batches)
    assert len(layers) == LAYERS and bool((layers["score"] > 0).all())
    vision_before = _vision_only(loaded.model, anatomy)

    plan = prune.make_plan(loaded, "layer", ratio=0.2, scores=layers)
    assert len(plan.layers_removed) == 1
    student = prune.prune(loaded, plan)
    assert student.anatomy.num_layers == LAYERS - 1 == student.model.config.text_config.num_hidden_layers
    layer_types = getattr(student.model.config.text_config, "layer_types", None)
    assert layer_types is None or len(layer_types) == LAYERS - 1

    heads = importance.unit_importance(student, batches, "heads", "taylor")
    neurons = importance.unit_importance(student, batches, "neurons", "taylor")
    assert bool((heads["score"] > 0).any()) and bool((neurons["score"] > 0).all())
    width = prune.make_plan(student, "width", ratio=0.3, scores={"heads": heads, "neurons": neurons},
                            layer_range=(0, LAYERS - 1))
    student = prune.prune(student, width)
    a = student.anatomy
    assert a.uniform and a.intermediate_size < 128
    text = student.model.config.text_config
    assert (text.num_attention_heads, text.num_key_value_heads, text.intermediate_size) == (
        a.num_attention_heads, a.num_key_value_heads, a.intermediate_size)
    if a.heads_prunable:
        assert a.num_attention_heads < 4 and a.num_attention_heads % a.num_key_value_heads == 0  # GQA groups kept whole
    for norm in a.head_norms:  # shared per-head norms keep head_dim weights
        assert getattr(a.decoder_layers(student.model)[0].get_submodule(a.attention), norm).weight.shape == (16,)

    result = recover.recover(student.model, a, student.prompt, selection.records,
                             recover.RecoveryConfig(mode=RECOVERY[name], max_steps=2, batch_size=2, learning_rate=1e-3))
    assert result.steps == 2 and all(torch.isfinite(torch.tensor(result.losses)))
    model = result.model
    after = _vision_only(model, a)
    assert vision_before.keys() == after.keys() and all(torch.equal(vision_before[k], after[k]) for k in after)

    out = prune.save_pruned(model, student.processor, tmp_path / "pruned", width)
    reloaded = models.load(str(out))
    assert reloaded.anatomy.num_layers == LAYERS - 1 and reloaded.anatomy.intermediate_size == a.intermediate_size
    student.model = model
    assert (_logits(reloaded, batches[0]) - _logits(student, batches[0])).abs().max() < 1e-5
    difference, same_answer = export.verify_export(out, out, remote_code=False)
    assert difference <= 1e-4 and same_answer


@pytest.fixture(scope="module")
def folder_of(tmp_path_factory):
    built = {}

    def get(name):
        if name not in built:
            built[name] = BUILDERS[name](tmp_path_factory.mktemp(name) / "model")
        return built[name]
    return get


def _images():
    """Two images of different shapes: variable-count families give them different visual-token counts."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    return [Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8)) for shape in ((32, 32, 3), (40, 72, 3))]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_family_visual_token_pruning(name, folder_of):
    from compression.measure import evaluate
    from compression.methods import tokens
    from compression.models.prompting import question_inputs

    loaded = models.load(str(folder_of(name)))
    anatomy = loaded.anatomy
    images, questions = _images(), ["what colour is the square?", "is there a cat?"]
    inputs = question_inputs(loaded.prompt, images, questions)
    counts = (inputs["input_ids"] == anatomy.image_token_index).sum(1).tolist()
    assert all(c > 0 for c in counts)
    if anatomy.visual_tokens_fixed:
        assert counts == [anatomy.visual_tokens] * 2
    plain = evaluate.generate(loaded.model, loaded.prompt, inputs, max_new_tokens=4)
    # keeping every token must be the same computation as the model's own (positions, masks, DeepStack)
    kept_all = evaluate.generate(loaded.model, loaded.prompt, inputs, max_new_tokens=4,
                                 generate_fn=tokens.make_generate_fn(1.0, "none"))
    assert kept_all == plain
    pruned = tokens.prune_visual_tokens(loaded.model, inputs, tokens.TokenPruningConfig(0.5, "hybrid"))
    kept = pruned.kept if isinstance(pruned.kept, list) else list(pruned.kept)
    assert [len(k) for k in kept] == [tokens.keep_count(c, 0.5) for c in counts]
    assert pruned.attention_mask.sum(1).tolist() == [
        int(m) - c + tokens.keep_count(c, 0.5) for m, c in zip(inputs["attention_mask"].sum(1), counts)]
    answers = evaluate.generate(loaded.model, loaded.prompt, inputs, max_new_tokens=4,
                                generate_fn=tokens.make_generate_fn(0.5, "hybrid"))
    assert len(answers) == 2
    grid = tokens.analyze_tokens(loaded, images[1], questions[1])
    rows, cols = grid["grid"]
    assert rows * cols + int(grid["cls_outside_grid"]) == grid["visual_tokens"] == counts[1]


@pytest.mark.parametrize("name", [n for n in BUILDERS if n != "llava"])  # LLaVA's: tests/test_prune.py
def test_family_non_uniform_widths_reload_with_their_modeling_file(name, folder_of, tmp_path):
    loaded = models.load(str(folder_of(name)))
    plan = prune.make_plan(loaded, "width", ratio=0.2, layer_range=(1, LAYERS))  # layer 0 stays whole
    student = prune.prune(loaded, plan)
    family = families.family_for(name)
    assert not student.anatomy.uniform and student.model.config.model_type == family.pruned_model_type
    out = prune.save_pruned(student.model, student.processor, tmp_path / "pruned", plan)
    assert (out / "modeling_vlm_pruned.py").is_file() and (out / "configuration_vlm_pruned.py").is_file()
    reloaded = models.load(str(out))
    assert reloaded.anatomy.intermediate_per_layer == student.anatomy.intermediate_per_layer
    assert reloaded.anatomy.heads_per_layer == student.anatomy.heads_per_layer
    difference, same_answer = export.verify_export(out, out, remote_code=True)
    assert difference <= 1e-4 and same_answer


@pytest.mark.parametrize("name", list(BUILDERS))  # every family: mergers in the tower, text_model, tied heads
def test_family_int8_quantizes_the_decoder_only_and_round_trips(name, folder_of, tmp_path):
    import bitsandbytes as bnb

    from compression.methods import quantize
    from compression.models.prompting import question_inputs

    loaded = models.load(str(folder_of(name)))
    anatomy = loaded.anatomy
    inputs = question_inputs(loaded.prompt, _images()[:1], ["what colour is the square?"])
    with torch.no_grad():
        base = loaded.model(**inputs).logits
    quantize.quantize_model(loaded.model, anatomy, "int8")
    linears = quantize.decoder_linears(loaded.model, anatomy)
    assert len(linears) == LAYERS * 7 and all(isinstance(m, bnb.nn.Linear8bitLt) for _, _, m in linears.values())
    kept_fp = [anatomy.vision_tower, *anatomy.projectors, anatomy.lm_head]
    for path in kept_fp:
        module = loaded.model.get_submodule(path) if path != "model.image_newline" else None
        assert module is None or not any(type(m).__module__.startswith("bitsandbytes") for m in module.modules())
    assert set(loaded.model.config.quantization_config.llm_int8_skip_modules) == set(anatomy.skip_quantization)
    with torch.no_grad():
        logits = loaded.model(**inputs).logits
    assert (logits - base).abs().mean() < 0.05 * base.abs().mean()
    folder = quantize.save_quantized(loaded.model, loaded.processor, tmp_path / "int8", "int8")
    again = models.load(str(folder))
    assert quantize.quantization_format(again.model) == "int8"
    with torch.no_grad():
        assert torch.allclose(again.model(**inputs).logits, logits, atol=1e-4)


def test_hub_style_qwen_processor_files_load_without_torchvision_and_keep_the_video_config(folder_of, tmp_path):
    """Released Qwen2.5-VL folders keep the image and video processors in their own files, naming the torchvision
    classes; here the image-only processor reads them, and saving carries the video config through unchanged."""
    import json
    import shutil

    from compression.models import load_processor
    from compression.models.families.processors import save_processor

    source = folder_of("qwen2_5_vl")
    hub = tmp_path / "hub"
    shutil.copytree(source, hub)
    config = json.loads((hub / "processor_config.json").read_text())
    image = dict(config["image_processor"], image_processor_type="Qwen2VLImageProcessor")
    video = {"video_processor_type": "Qwen2VLVideoProcessor", "patch_size": 14, "merge_size": 2,
             "temporal_patch_size": 2, "fps": 2.0}
    (hub / "preprocessor_config.json").write_text(json.dumps(image))
    (hub / "video_preprocessor_config.json").write_text(json.dumps(video))
    (hub / "processor_config.json").write_text(json.dumps({"processor_class": "Qwen2_5_VLProcessor"}))
    processor = load_processor(hub, family=families.family_for("qwen2_5_vl"))
    assert type(processor).__name__ == "Qwen2_5_VLProcessor" and processor.chat_template
    assert type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    save_processor(processor, tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor" and saved["video_processor"] == video
