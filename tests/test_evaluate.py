"""The one evaluation path: scoring by the data's metric, per-type figures, sizes, interleaved latency."""
import torch

from compression import models
from compression.data.records import record_from
from compression.data.sources import open_source, select
from compression.measure import evaluate
from tests.tiny import save_tiny, shapes_records, tiny_llava, tiny_loaded


def test_normalize_answer_is_vqa_style():
    assert evaluate.normalize_answer(" Top-Left. ") == "top left"
    assert evaluate.normalize_answer("Yes!") == "yes"
    assert evaluate.normalize_answer("Two dogs.") == "2 dogs"
    assert evaluate.normalize_answer("The red one") == "red 1"


def _answer_ids_fn(processor, answers):
    """A generate_fn that answers from a fixed list, to check the bookkeeping exactly."""
    queue = list(answers)

    def fn(model, inputs, max_new_tokens):
        n = inputs["input_ids"].shape[0]
        batch, queue[:] = queue[:n], queue[n:]
        ids = [processor.tokenizer(" " + a, add_special_tokens=False)["input_ids"] for a in batch]
        width = max(map(len, ids))
        return torch.tensor([i + [processor.tokenizer.pad_token_id] * (width - len(i)) for i in ids])
    return fn


def test_accuracy_counts_exact_matches_per_type():
    loaded = tiny_loaded()
    records = shapes_records("test", 40)
    wrong = {3, 7, 8, 20, 31}  # a chosen set of wrong answers
    answers = [("zero" if r.answer != "zero" else "one") if i in wrong else r.answer for i, r in enumerate(records)]
    result = evaluate.accuracy(loaded, records, batch_size=16, generate_fn=_answer_ids_fn(loaded.processor, answers))
    assert result.n == 40 and result.metric == "exact_match"
    assert result.accuracy == (40 - len(wrong)) / 40
    for qtype, acc in result.per_type.items():
        idx = [i for i, r in enumerate(records) if r.type == qtype]
        assert acc == sum(i not in wrong for i in idx) / len(idx)
    assert result.predictions[3] in ("zero", "one") and result.predictions[0] == records[0].answer


def test_metric_follows_the_data_yes_no_and_multiple_choice():
    loaded = tiny_loaded()
    image = shapes_records("test", 1)[0].images[0]
    yes_no = [record_from(i, "is there a red circle ?", a, image) for i, a in enumerate(["yes", "no", "yes", "no"])]
    result = evaluate.accuracy(loaded, yes_no, generate_fn=_answer_ids_fn(loaded.processor, ["yes", "yes", "no", "no"]))
    # truth y n y n, said y y n n: tp 1, fp 1, fn 1
    assert result.metric == "yes_no" and result.accuracy == 0.5
    assert result.details["precision"] == 0.5 and result.details["recall"] == 0.5 and result.details["yes_ratio"] == 0.5
    choices = [record_from(i, "what shape is at the top-left ?", a, image, choices=["circle", "square", "triangle"])
               for i, a in enumerate(["A", "square", "2"])]
    seen = []

    def spy(model, inputs, max_new_tokens):
        seen.append(loaded.processor.tokenizer.decode(inputs["input_ids"][0], skip_special_tokens=True))
        return _answer_ids_fn(loaded.processor, ["circle", "triangle", "triangle"])(model, inputs, max_new_tokens)

    result = evaluate.accuracy(loaded, choices, generate_fn=spy)
    # answers A, square (= B), 2 (= C); said circle (A), triangle (C), triangle (C): right, wrong, right
    assert result.metric == "multiple_choice" and result.accuracy == 2 / 3
    # the options are rendered into the prompt (the reference tokenizer lower-cases and drops what it lacks)
    assert "circle" in seen[0] and "triangle" in seen[0] and "square" in seen[0]


def test_batched_answers_equal_one_at_a_time():
    loaded = tiny_loaded("mistral")
    records = shapes_records("test", 6)
    images, questions = [r.images[0] for r in records], [r.question for r in records]
    batched = evaluate.answer_questions(loaded, images, questions, max_new_tokens=3)
    single = [evaluate.answer_questions(loaded, [im], [q], max_new_tokens=3)[0] for im, q in zip(images, questions)]
    assert batched == single


def test_sizes_are_the_stored_bytes(tmp_path):
    folder = save_tiny(tmp_path / "m")
    loaded = models.load(str(folder))
    n = sum(p.numel() for p in loaded.model.parameters())
    assert models.tensor_bytes(loaded.model) >= 4 * n
    on_disk = evaluate.size_bytes(loaded.model, folder)
    assert 4 * n <= on_disk < 4 * n + 100_000  # fp32 tensors plus the safetensors header
    report = evaluate.evaluate(loaded, select(open_source("shapes"), samples=8), measure_latency=False)
    assert report.params_total == n and report.size_bytes == on_disk and report.prefill_ms is None
    assert 0 <= report.accuracy <= 1 and report.samples == 8
    assert report.data == "8 records of ShapesVQA (test)" and "no chat template" in report.prompt


def test_latency_is_interleaved_medians():
    a, processor, _ = tiny_llava(layers=1)
    b, _, _ = tiny_llava(layers=3)
    inputs = evaluate.latency_inputs(tiny_loaded(layers=1), shapes_records("test", 1)[0])
    calls = []
    original = evaluate._time_one

    def spy(model, inputs, decode_tokens):
        calls.append(model)
        return original(model, inputs, decode_tokens)

    evaluate._time_one = spy
    try:
        result = evaluate.latency({"a": a, "b": b}, inputs, repeats=3, warmup=1, decode_tokens=4)
    finally:
        evaluate._time_one = original
    assert calls == [a, b] * 4  # warm-up then repeats, alternating
    for name in "ab":
        assert result[name]["prefill_ms"] > 0 and result[name]["decode_tokens_per_s"] > 0
        assert result[name]["repeats"] == 3


def test_latency_rotates_takes_minima_and_feeds_given_inputs():
    import pytest

    from compression.methods import tokens

    a, _, _ = tiny_llava(layers=1)
    b, _, _ = tiny_llava(layers=2)
    inputs = evaluate.latency_inputs(tiny_loaded(layers=1), shapes_records("test", 1)[0])
    with torch.no_grad():
        merged = tokens.merge_inputs(a, inputs)
    embeds = {"inputs_embeds": merged.inputs_embeds, "attention_mask": merged.attention_mask}
    calls = []
    original = evaluate._time_one

    def spy(model, fed, decode_tokens):
        calls.append((model, "inputs_embeds" in fed))
        return original(model, fed, decode_tokens)

    evaluate._time_one = spy
    try:
        result = evaluate.latency({"a": a, "b": b, "a-embeds": a}, inputs, repeats=3, warmup=0, decode_tokens=0,
                                  inputs_by_name={"a-embeds": embeds}, statistic="min", rotate=True)
    finally:
        evaluate._time_one = original
    a_e = (a, True)
    assert calls == [(a, False), (b, False), a_e, (b, False), a_e, (a, False), a_e, (a, False), (b, False)]
    for name in ("a", "b", "a-embeds"):
        r = result[name]
        assert r["prefill_ms"] == min(r["prefill_ms_all"]) and len(r["prefill_ms_all"]) == 3
        assert r["decode_tokens_per_s"] is None and r["statistic"] == "min"
    with pytest.raises(ValueError, match="statistic"):
        evaluate.latency({"a": a}, inputs, statistic="mean")
    with pytest.raises(ValueError, match="inputs for every model"):
        evaluate.latency({"a": a}, None)
