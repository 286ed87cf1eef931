"""Importance: block influence against a hand computation, Taylor against hand-computed gradients, caching, CLI."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compression.methods import importance
from compression import models
from compression.methods.importance import (SCORERS, cached_importance, calibration_batches, calibration_selection,
                                           coupled_groups, layer_importance, unit_importance)
from tests.tiny import tiny_llava


def _loaded(language="llama", vision="clip", **kwargs) -> models.LoadedModel:
    model, processor, anatomy = tiny_llava(language, vision, **kwargs)
    return models.LoadedModel(model, processor, anatomy, "tiny", "local", None, True, f"tiny-{language}-{vision}")


@pytest.fixture(scope="module")
def samples():
    return calibration_selection("shapes", 6).records


def test_block_influence_matches_hand_computation(samples):
    loaded = _loaded("qwen2", "siglip")
    frame = layer_importance(loaded, samples, "block_influence")
    assert list(frame.columns) == ["layer", "score", "method"] and len(frame) == 3
    # by hand: hidden states of every layer boundary, with the final norm removed so that the
    # last entry is the raw output of the last layer
    batches = calibration_batches(loaded.prompt, samples)
    language = loaded.model.model.language_model
    norm, language.norm = language.norm, nn.Identity()
    sums, count = torch.zeros(3, dtype=torch.float64), 0
    try:
        with torch.no_grad():
            for b in batches:
                out = loaded.model(**{k: v for k, v in b.items() if k != "labels"}, output_hidden_states=True)
                mask = b["attention_mask"].double()
                for i in range(3):
                    cos = F.cosine_similarity(out.hidden_states[i], out.hidden_states[i + 1], dim=-1).double()
                    sums[i] += ((1 - cos) * mask).sum()
                count += int(mask.sum())
    finally:
        language.norm = norm
    assert torch.allclose(torch.tensor(frame["score"].values), sums / count, atol=1e-5)


def test_an_identity_layer_scores_zero_on_both_layer_methods(samples):
    loaded = _loaded()
    layer = loaded.anatomy.decoder_layers(loaded.model)[1]
    with torch.no_grad():  # no attention output, no MLP output: the layer passes its input through
        layer.self_attn.o_proj.weight.zero_()
        layer.mlp.down_proj.weight.zero_()
    bi = layer_importance(loaded, samples, "block_influence")["score"].tolist()
    removal = layer_importance(loaded, samples, "removal_loss")["score"].tolist()
    assert abs(bi[1]) < 1e-6 and min(bi[0], bi[2]) > 1e-3
    assert abs(removal[1]) < 1e-6 and max(abs(removal[0]), abs(removal[2])) > 1e-4


def test_taylor_matches_hand_computed_gradients_with_gqa_share(samples):
    loaded = _loaded("llama", "clip", num_key_value_heads=2)  # 4 heads, groups of 2
    # three mini-batches of 2: their token-weighted gradients must sum to the full batch's
    mini = calibration_batches(loaded.prompt, samples, batch_size=2)
    frame = unit_importance(loaded, mini, "heads", "taylor")
    neurons = unit_importance(loaded, mini, "neurons", "taylor")
    model, anatomy = loaded.model, loaded.anatomy
    # the same loss by hand: mean answer-token cross-entropy over every sample, one backward
    batches = calibration_batches(loaded.prompt, samples, batch_size=len(samples))
    model.zero_grad()
    model(**batches[0]).loss.backward()
    attn = anatomy.decoder_layers(model)[2].self_attn
    mlp = anatomy.decoder_layers(model)[2].mlp
    hd, head, group = anatomy.head_dim, 3, 2

    def taylor(p, index=None):
        t = (p.detach() * p.grad).abs()
        return float(t if index is None else t[index]) if t.dim() == 0 else float((t if index is None else t[index]).sum())

    rows = slice(head * hd, (head + 1) * hd)
    kv_rows = slice((head // group) * hd, (head // group + 1) * hd)
    expected = (taylor(attn.q_proj.weight, rows) + float((attn.o_proj.weight.detach() * attn.o_proj.weight.grad)
                                                         .abs()[:, rows].sum())
                + (taylor(attn.k_proj.weight, kv_rows) + taylor(attn.v_proj.weight, kv_rows)) / group)
    got = frame[(frame["layer"] == 2) & (frame["head"] == head)]["score"].item()
    assert got == pytest.approx(expected, rel=1e-4)
    assert frame[(frame["layer"] == 2) & (frame["head"] == head)]["kv_head"].item() == 1
    j = 17
    expected_neuron = (taylor(mlp.gate_proj.weight, j) + taylor(mlp.up_proj.weight, j)
                       + float((mlp.down_proj.weight.detach() * mlp.down_proj.weight.grad).abs()[:, j].sum()))
    assert neurons[(neurons.layer == 2) & (neurons.neuron == j)]["score"].item() == pytest.approx(expected_neuron,
                                                                                                   rel=1e-4)
    model.zero_grad(set_to_none=True)


def test_taylor_asks_gradients_only_of_scored_weights_and_frees_them(samples):
    loaded = _loaded()
    model = loaded.model
    groups = coupled_groups(model, loaded.anatomy, "neurons")
    importance._accumulate_gradients(model, groups, calibration_batches(loaded.prompt, samples))
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all(".mlp." in n for n in with_grad)
    assert all(p.requires_grad for p in model.parameters())  # restored afterwards
    model.zero_grad(set_to_none=True)
    unit_importance(loaded, samples, "heads", "taylor")
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("language,kv_heads", [("llama", 2), ("qwen2", 1), ("phi", 4)])  # GQA, MQA, MHA + biases
def test_lean_taylor_equals_the_old_path_and_holds_one_gradient_at_a_time(samples, language, kv_heads):
    loaded = _loaded(language, "clip", num_key_value_heads=kv_heads)
    mini = calibration_batches(loaded.prompt, samples, batch_size=2)  # the old path sums 3 mini-batches
    old = importance.unit_importances(loaded, mini, lean=False)
    groups = [g for k in ("heads", "neurons") for g in coupled_groups(loaded.model, loaded.anatomy, k)]
    scored = list({id(p): p for g in groups for p, _ in importance._per_unit_parts(g)}.values())
    alive: list[int] = []
    # registered before the lean path's own hooks, so each runs just before that weight is scored and freed
    handles = [p.register_post_accumulate_grad_hook(lambda p: alive.append(sum(q.grad is not None for q in scored)))
               for p in scored]
    try:
        lean = importance.unit_importances(loaded, mini, lean=True)
    finally:
        for h in handles:
            h.remove()
    for kind in ("heads", "neurons"):
        assert lean[kind].drop(columns="score").equals(old[kind].drop(columns="score"))
        a, b = torch.tensor(lean[kind]["score"].values), torch.tensor(old[kind]["score"].values)
        assert (b > 0).all() and ((a - b).abs() / b).max() < 1e-5, kind
    assert len(alive) == len(scored) and max(alive) == 1  # each gradient freed before the next arrives
    assert all(p.grad is None for p in loaded.model.parameters())
    assert all(p.requires_grad for p in loaded.model.parameters())
    no_recompute = importance.unit_importances(loaded, mini, kinds=("neurons",), lean=True, recompute=False)
    assert torch.allclose(torch.tensor(no_recompute["neurons"]["score"].values),
                          torch.tensor(lean["neurons"]["score"].values), rtol=1e-5, atol=0)


def test_merged_batches_pad_on_the_right_without_image_tokens(samples):
    loaded = _loaded()
    mini = calibration_batches(loaded.prompt, samples, batch_size=4)  # widths differ between the two
    merged = importance.merge_batches(mini, pad_token_id=0)
    assert merged["input_ids"].shape[0] == 6 and merged["pixel_values"].shape[0] == 6
    width = max(b["input_ids"].shape[1] for b in mini)
    assert merged["input_ids"].shape[1] == width
    assert int(merged["attention_mask"].sum()) == sum(int(b["attention_mask"].sum()) for b in mini)
    assert int((merged["labels"] != -100).sum()) == sum(int((b["labels"] != -100).sum()) for b in mini)
    image = loaded.model.config.image_token_index
    assert int((merged["input_ids"] == image).sum()) == sum(int((b["input_ids"] == image).sum()) for b in mini)


def test_zeroed_neuron_scores_zero_on_every_scorer(samples):
    loaded = _loaded()
    mlp = loaded.anatomy.decoder_layers(loaded.model)[0].mlp
    with torch.no_grad():
        mlp.up_proj.weight[5].zero_()
        mlp.gate_proj.weight[5].zero_()
        mlp.down_proj.weight[:, 5].zero_()
    for method in SCORERS:
        frame = unit_importance(loaded, samples, "neurons", method)
        layer0 = frame[frame.layer == 0].set_index("neuron")["score"]
        assert layer0[5] == pytest.approx(0.0, abs=1e-12), method
        assert (layer0.drop(5) > 0).all(), method
        assert list(frame.columns) == ["layer", "neuron", "score", "method"]


def test_scorers_share_one_call_signature():
    loaded = _loaded()
    for kind, units in (("heads", 4), ("neurons", 96)):
        group = coupled_groups(loaded.model, loaded.anatomy, kind)[0]
        group.activation = torch.ones(units)
        for name, cls in SCORERS.items():
            if cls.needs == "gradients":
                for lin in group.rows + group.cols + group.shared_rows:
                    lin.weight.grad = torch.ones_like(lin.weight)
                    if lin.bias is not None:
                        lin.bias.grad = torch.ones_like(lin.bias)
            scores = cls()(group)
            assert scores.shape == (units,), (name, kind)


def test_cached_importance_is_stored_and_reused(monkeypatch):
    loaded = _loaded()
    calibration = calibration_selection("shapes", 2)
    first = cached_importance(loaded, "heads", "taylor", calibration)
    path = importance.importance_path(loaded, "heads", "taylor", calibration)
    assert path.name == f"tiny-llama-clip-{calibration.fingerprint()}-heads-taylor.csv" and path.is_file()
    # another selection of the same data is another calibration set: another file
    assert importance.importance_path(loaded, "heads", "taylor", calibration_selection("shapes", 2, seed=1)) != path

    def boom(*args, **kwargs):
        raise AssertionError("recomputed instead of read from the cache")

    monkeypatch.setattr(importance, "unit_importance", boom)
    second = cached_importance(loaded, "heads", "taylor", calibration)
    assert second.equals(first)
    with pytest.raises(ValueError, match="does not score layers"):
        cached_importance(loaded, "layers", "taylor", calibration)
    with pytest.raises(ValueError, match="taylor importance needs calibration data"):
        cached_importance(loaded, "heads", "taylor")


def test_cli_analyze(tmp_path, capsys):
    from compression.cli import main as cli
    from tests.tiny import save_tiny

    folder = save_tiny(tmp_path / "m", "phi", "clip", num_key_value_heads=4)
    assert cli.main(["analyze", "--model", str(folder), "--kind", "layers", "--samples", "2", "--data", "shapes",
                     "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["kind"] == "layers" and payload["method"] == "block_influence" and len(payload["scores"]) == 3
    assert payload["data"] == "2 records of ShapesVQA (train)" and payload["samples"] == 2
    assert {"layer", "score"} <= set(payload["scores"][0])
    assert cli.main(["analyze", "--model", str(folder), "--kind", "heads", "--method", "magnitude", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)["scores"]
    assert len(rows) == 12 and {"layer", "head", "score"} <= set(rows[0])
    for argv in (["--kind", "layers", "--method", "taylor"], ["--kind", "heads", "--samples", "0"],
                 ["--kind", "tokens"], ["--kind", "layers"]):  # the last: no --data for a model of one's own
        assert cli.main(["analyze", "--model", str(folder), *argv]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error:")
    assert cli.main(["analyze", "--model", "config:llava-1.5-7b", "--kind", "layers"]) == 2
