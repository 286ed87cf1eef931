"""Visual-token scores (hand-computed) and visual-token pruning at inference, on tiny random LLaVAs."""
import json
import math

import pytest
import torch

from compression.data import shapes as data
from compression.measure import evaluate
from compression.methods import tokens
from compression.models import LoadedModel
from tests.tiny import encode, generate_answers, tiny_llava

# Different lengths on purpose: the batch is left-padded.
QUESTIONS = ["how many red shapes are there ?", "what color is the circle ?", "is there a red square ?",
             "what shape is at the top-left ?"]


@pytest.fixture(scope="module")
def llama_clip():
    return tiny_llava("llama", "clip")


@pytest.fixture(scope="module")
def batch():
    return [data.generate("test", i).image for i in range(len(QUESTIONS))], QUESTIONS


# ------------------------------------------------------------------------------------------ pure scores

def test_outlier_intensity_is_range_over_channels():
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 0.7, -0.2, 0.1]])
    assert tokens.outlier_intensity(v).tolist() == pytest.approx([5.0, 0.9])


def test_int4_error_matches_hand_computation():
    # token 0: scale 3/7; v/scale = [2.33, -4.67, 7, 1.17] -> [2, -5, 7, 1]; errors [1, 1, 0, 0.5] / 7
    # token 1: scale 0.1; v/scale = [0, 7, -2, 1] exactly on the grid -> no error
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 0.7, -0.2, 0.1]])
    assert tokens.int4_quantize(v)[0].tolist() == pytest.approx([6 / 7, -15 / 7, 3.0, 3 / 7])
    assert tokens.int4_group_error(v).tolist() == pytest.approx([1.5 / 7, 0.0], abs=1e-6)


def test_int4_groups_have_their_own_scale():
    # whole vector: scale 1 -> [7, 1, 1, 0], errors [0, 0, 0.3, 0.26]
    # groups of 2: [7, 1] exact; [0.7, 0.26] scale 0.1 -> [0.7, 0.3], error 0.04
    v = torch.tensor([[7.0, 1.0, 0.7, 0.26]])
    assert tokens.int4_group_error(v, group=128).item() == pytest.approx(math.sqrt(0.3 ** 2 + 0.26 ** 2), abs=1e-5)
    assert tokens.int4_group_error(v, group=2).item() == pytest.approx(0.04, abs=1e-5)
    # a dimension that groups do not divide: a last, shorter group
    assert tokens.int4_group_error(torch.tensor([[7.0, 1.0, 0.7]]), group=2).item() == pytest.approx(0.0, abs=1e-6)


def test_minmax_quantization_and_hybrid_scores():
    assert tokens.minmax(torch.tensor([2.0, 4.0, 6.0])).tolist() == pytest.approx([0.0, 0.5, 1.0])
    assert tokens.minmax(torch.tensor([3.0, 3.0])).tolist() == [0.0, 0.0]
    v = torch.tensor([[1.0, -2.0, 3.0, 0.5], [0.0, 0.7, -0.2, 0.1], [0.0, 0.0, 0.0, 0.0]])
    # E = [1.5/7, 0, 0] -> [1, 0, 0]; R = [5, 0.9, 0] -> [1, 0.18, 0]
    assert tokens.quantization_score(v).tolist() == pytest.approx([1.0, 0.09, 0.0], abs=1e-6)
    semantic = torch.tensor([1.0, 3.0, 2.0])  # -> [0, 1, 0.5]
    quant = torch.tensor([1.0, 0.0, 0.5])
    assert tokens.hybrid_score(semantic, quant, alpha=0.7).tolist() == pytest.approx([0.3, 0.7, 0.5])
    with pytest.raises(ValueError, match="alpha 1.5"):
        tokens.hybrid_score(semantic, quant, alpha=1.5)


def test_keep_count_and_selection_keep_original_order():
    assert [tokens.keep_count(16, r) for r in (1.0, 0.5, 0.25, 0.125)] == [16, 8, 4, 2]
    assert tokens.keep_count(4, 0.125) == 1  # never zero
    scores = torch.tensor([[0.1, 0.9, 0.5, 0.7], [0.8, 0.1, 0.9, 0.2]])
    assert tokens.select_tokens(scores, 2).tolist() == [[1, 3], [0, 2]]


def test_pruning_config_rejects_bad_values_and_maps_recipe_names():
    with pytest.raises(ValueError, match="scorer 'magic'"):
        tokens.TokenPruningConfig(0.5, "magic")
    with pytest.raises(ValueError, match=r"keep_ratio 0 must lie in \(0, 1\]"):
        tokens.TokenPruningConfig(0, "random")
    with pytest.raises(ValueError, match="needs a scorer"):
        tokens.TokenPruningConfig(0.5, "none")
    hybrid = tokens.TokenPruningConfig(0.5, "attention", alpha=0.7)
    assert (hybrid.scorer, hybrid.semantic) == ("hybrid", "attention")
    assert tokens.TokenPruningConfig(0.5, "similarity", alpha=1.0).scorer == "semantic"
    assert tokens.TokenPruningConfig(0.5, "quantization").scorer == "outlier"


# ------------------------------------------------------------------------------------------ pruning on a model

def test_keep_all_gives_the_same_answers_as_plain_generate(llama_clip, batch):
    model, processor, _ = llama_clip
    images, questions = batch
    plain = generate_answers(model, processor, images, questions)
    for scorer, positions in (("none", "contiguous"), ("hybrid", "contiguous"), ("none", "original")):
        pruned = generate_answers(model, processor, images, questions,
                                           generate_fn=tokens.make_generate_fn(1.0, scorer, positions=positions))
        assert pruned == plain


@pytest.mark.parametrize("scorer", ["semantic", "outlier", "hybrid", "random"])
def test_pruning_keeps_exactly_k_tokens_in_order(llama_clip, batch, scorer):
    model, processor, anatomy = llama_clip
    images, questions = batch
    inputs = encode(processor, images, questions)
    assert (inputs["attention_mask"] == 0).any(), "the batch should be left-padded"
    merged = tokens.merge_inputs(model, inputs)
    pruned = tokens.prune_visual_tokens(model, inputs, tokens.TokenPruningConfig(0.5, scorer))
    n = anatomy.visual_tokens
    assert pruned.kept.shape == (len(questions), 2)
    assert bool((pruned.kept[:, 1:] > pruned.kept[:, :1]).all())  # ascending = original order
    length = inputs["input_ids"].shape[1] - (n - 2)
    assert pruned.inputs_embeds.shape == (len(questions), length, anatomy.hidden_size)
    # padding is untouched and the kept visual tokens sit where the image was, in order
    assert pruned.attention_mask.sum(-1).tolist() == (inputs["attention_mask"].sum(-1) - (n - 2)).tolist()
    for b in range(len(questions)):
        start = int(merged.image_positions[b, 0])
        assert torch.equal(pruned.inputs_embeds[b, start:start + 2], merged.features[b, pruned.kept[b]])
        assert torch.equal(pruned.inputs_embeds[b, start + 2:], merged.inputs_embeds[b, start + n:])


def test_original_positions_keep_the_dense_position_ids(llama_clip, batch):
    model, processor, anatomy = llama_clip
    images, questions = batch
    inputs = encode(processor, images, questions)
    pruned = tokens.prune_visual_tokens(model, inputs, tokens.TokenPruningConfig(0.5, "random", positions="original"))
    mask = inputs["attention_mask"]
    dense = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)
    merged = tokens.merge_inputs(model, inputs)
    for b in range(len(questions)):
        start = int(merged.image_positions[b, 0])
        assert pruned.position_ids[b, start:start + 2].tolist() == dense[b, start + pruned.kept[b]].tolist()
        assert pruned.position_ids[b, -1] == dense[b, -1]  # the text after the image keeps its place
    assert "position_ids" in pruned.model_kwargs()
    contiguous = tokens.TokenPruningConfig(0.5, "random", positions="contiguous")
    assert "position_ids" not in tokens.prune_visual_tokens(model, inputs, contiguous).model_kwargs()


def test_pruned_answer_path_on_siglip_and_latency_inputs(batch):
    model, processor, anatomy = tiny_llava("qwen2", "siglip")
    images, questions = batch
    answers = generate_answers(model, processor, images, questions,
                                        generate_fn=tokens.make_generate_fn(0.25, "hybrid"))
    assert len(answers) == len(questions) and all(isinstance(a, str) for a in answers)
    kwargs = tokens.make_inputs_fn(0.5, "semantic", semantic="similarity")(
        model, encode(processor, images[:1], questions[:1]))
    assert set(kwargs) == {"inputs_embeds", "attention_mask", "position_ids"}  # default: original positions
    dense = encode(processor, images[:1], questions[:1])["input_ids"].shape[1]
    assert kwargs["inputs_embeds"].shape[1] == dense - anatomy.visual_tokens // 2
    assert model(**kwargs).logits.shape[1] == kwargs["inputs_embeds"].shape[1]


def test_random_scorer_is_seeded(llama_clip, batch):
    model, processor, _ = llama_clip
    inputs = encode(processor, *batch)
    config = tokens.TokenPruningConfig(0.5, "random", seed=3)
    first = tokens.prune_visual_tokens(model, inputs, config, torch.Generator().manual_seed(3)).kept
    again = tokens.prune_visual_tokens(model, inputs, config, torch.Generator().manual_seed(3)).kept
    assert torch.equal(first, again)


# ------------------------------------------------------------------------------------------ analysis maps

@pytest.mark.parametrize("vision", ["clip", "siglip"])
def test_analyze_tokens_grids(vision, batch):
    model, processor, anatomy = tiny_llava("llama", vision)
    loaded = LoadedModel(model, processor, anatomy, "tiny", "local", None, True, "tiny")
    out = tokens.analyze_tokens(loaded, batch[0][0], batch[1][0])
    json.dumps(out)
    assert out["kind"] == "tokens" and out["grid"] == [2, 2] and out["attention_layer"] == 2
    for name in ("outlier", "quant_error", "quant_score", "semantic_similarity", "semantic_attention", "hybrid"):
        assert len(out[name]) == 2 and all(len(row) == 2 for row in out[name]), name
    flat = lambda name: torch.tensor(out[name]).flatten()  # noqa: E731
    assert flat("quant_score").min().item() == pytest.approx(0.0) and flat("quant_score").max().item() == pytest.approx(1.0)
    expected = tokens.hybrid_score(flat("semantic_attention"), flat("quant_score"), 0.7)
    assert flat("hybrid").tolist() == pytest.approx(expected.tolist(), abs=1e-6)
    # attention from the last token is a distribution over the whole sequence: the visual share is at most 1
    assert 0 < flat("semantic_attention").sum().item() <= 1
    assert len(out["scores"]) == 4 and out["scores"][3]["row"] == 1 and out["scores"][3]["col"] == 1
    deeper = tokens.analyze_tokens(loaded, batch[0][0], batch[1][0], layer=1)
    assert deeper["attention_layer"] == 1 and deeper["where"] == "input of decoder layer 1"
    assert deeper["outlier"] != out["outlier"]
    with pytest.raises(ValueError, match="layer 7 is out of range; expected 0..2"):
        tokens.analyze_tokens(loaded, batch[0][0], batch[1][0], layer=7)


def test_pruning_works_on_a_pruned_exported_model(batch, tmp_path):
    from compression import models
    from compression.methods import prune

    model, processor, anatomy = tiny_llava("llama", "clip", layers=4)
    plan = prune.make_plan((model, anatomy), "width", 0.2, layer_range=(1, 3))
    pruned_model, _ = prune.apply_plan(model, anatomy, plan)
    loaded = models.load(str(prune.save_pruned(pruned_model, processor, tmp_path / "pruned", plan)))
    assert loaded.model.config.model_type == "llava_pruned"
    images, questions = batch
    plain = generate_answers(loaded.model, loaded.processor, images, questions)
    assert generate_answers(loaded.model, loaded.processor, images, questions,
                                     generate_fn=tokens.make_generate_fn(1.0, "none")) == plain
    answers = generate_answers(loaded.model, loaded.processor, images, questions,
                                        generate_fn=tokens.make_generate_fn(0.5, "hybrid"))
    assert len(answers) == len(questions)
    assert tokens.analyze_tokens(loaded, images[0], questions[0], layer=3)["grid"] == [2, 2]
