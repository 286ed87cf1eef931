"""The one evaluation path: exact match, per-type figures, sizes, interleaved latency."""
import torch

from compression.data import shapes as data
from compression.measure import evaluate
from compression import models
from tests.tiny import save_tiny, tiny_llava


def test_normalize_answer():
    assert evaluate.normalize_answer(" Top-Left. ") == "top-left"
    assert evaluate.normalize_answer("Yes!") == "yes"


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
    model, processor, _ = tiny_llava()
    samples = data.load_split("test", 40)
    wrong = {3, 7, 8, 20, 31}  # a chosen set of wrong answers
    answers = [("zero" if s.answer != "zero" else "one") if i in wrong else s.answer for i, s in enumerate(samples)]
    result = evaluate.accuracy(model, processor, samples, batch_size=16,
                               generate_fn=_answer_ids_fn(processor, answers))
    assert result.n == 40
    assert result.accuracy == (40 - len(wrong)) / 40
    for qtype, acc in result.per_type.items():
        idx = [i for i, s in enumerate(samples) if s.qtype == qtype]
        assert acc == sum(i not in wrong for i in idx) / len(idx)
    assert result.predictions[3] in ("zero", "one") and result.predictions[0] == samples[0].answer


def test_batched_answers_equal_one_at_a_time():
    model, processor, _ = tiny_llava("mistral")
    samples = data.load_split("test", 6)
    batched = evaluate.generate_answers(model, processor, [s.image for s in samples], [s.question for s in samples],
                                        max_new_tokens=3, batch_size=6)
    single = [evaluate.generate_answers(model, processor, [s.image], [s.question], max_new_tokens=3)[0] for s in samples]
    assert batched == single


def test_sizes_are_the_stored_bytes(tmp_path):
    folder = save_tiny(tmp_path / "m")
    loaded = models.load(str(folder))
    n = sum(p.numel() for p in loaded.model.parameters())
    assert models.tensor_bytes(loaded.model) >= 4 * n
    on_disk = evaluate.size_bytes(loaded.model, folder)
    assert 4 * n <= on_disk < 4 * n + 100_000  # fp32 tensors plus the safetensors header
    report = evaluate.evaluate(loaded, data.load_split("test", 8), measure_latency=False)
    assert report.params_total == n and report.size_bytes == on_disk and report.prefill_ms is None
    assert 0 <= report.accuracy <= 1 and report.samples == 8


def test_latency_is_interleaved_medians():
    a, processor, _ = tiny_llava(layers=1)
    b, _, _ = tiny_llava(layers=3)
    calls = []
    original = evaluate._time_one

    def spy(model, inputs, decode_tokens):
        calls.append(model)
        return original(model, inputs, decode_tokens)

    evaluate._time_one = spy
    try:
        result = evaluate.latency({"a": a, "b": b}, processor, repeats=3, warmup=1, decode_tokens=4)
    finally:
        evaluate._time_one = original
    assert calls == [a, b] * 4  # warm-up then repeats, alternating
    for name in "ab":
        assert result[name]["prefill_ms"] > 0 and result[name]["decode_tokens_per_s"] > 0
        assert result[name]["repeats"] == 3
