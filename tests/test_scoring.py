"""Scoring by the data's metric: VQAv2 normalisation, multiple-choice letter extraction, POPE-style yes/no."""
import pytest

from compression.data.records import DataError, record_from
from compression.data.scoring import (answer_letter, choose_metric, extract_letter, normalize_answer,
                                      prompt_messages, render_choices, score, yes_no)


@pytest.mark.parametrize("text, normalized", [
    ("Two", "2"), ("two dogs.", "2 dogs"), ("The cat", "cat"), ("an apple!", "apple"), ("Yes.", "yes"),
    ("dont", "don't"), ("3.5", "3.5"), ("1,000", "1000"), ("red, blue", "red blue"), ("  Top-Left ", "top left"),
])
def test_vqa_normalisation(text, normalized):
    assert normalize_answer(text) == normalized


def test_choices_are_rendered_and_letters_extracted():
    choices = ["a cat", "a dog", "a bird"]
    prompt = render_choices("What animal?", choices)
    assert prompt == ("What animal?\nA. a cat\nB. a dog\nC. a bird\n"
                      "Answer with the option's letter from the given choices directly.")
    for said, letter in [("B", "B"), ("(C)", "C"), ("b", "B"), ("A. a cat", "A"), ("The answer is C.", "C"),
                         ("a dog", "B"), ("dog", "B"), ("fish", None), ("D", None), ("", None)]:
        assert extract_letter(said, choices) == letter, said
    assert answer_letter("B", choices) == "B" and answer_letter("2", choices) == "C"
    assert answer_letter("a bird", choices) == "C" and answer_letter("a fish", choices) is None


def test_metric_is_chosen_from_the_fields():
    plain = [record_from(0, "q", "red"), record_from(1, "q", "two")]
    binary = [record_from(0, "q", "Yes"), record_from(1, "q", "no")]
    mc = [record_from(0, "q", "A", choices=["x", "y"])]
    assert choose_metric(plain) == "exact_match"
    assert choose_metric(binary) == "yes_no"
    assert choose_metric(mc) == "multiple_choice"
    assert choose_metric(binary, "exact_match") == "exact_match"
    with pytest.raises(DataError, match="record 0 has no choices"):
        choose_metric(plain, "multiple_choice")
    with pytest.raises(DataError, match="metric 'bleu'"):
        choose_metric(plain, "bleu")


def test_pope_figures():
    records = [record_from(i, "is there a cat?", a) for i, a in enumerate(["yes", "yes", "yes", "no", "no"])]
    said = ["Yes, there is.", "no", "yes", "Yes", "No."]
    result = score(records, said)
    # truth y y y n n; said y n y y n: tp 2, fp 1, fn 1, tn 1
    assert result.metric == "yes_no" and result.accuracy == pytest.approx(3 / 5)
    assert result.details == pytest.approx({"precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "yes_ratio": 3 / 5})
    assert yes_no("I think no") == "no" and yes_no("maybe") is None


def test_per_type_and_the_rendered_prompt():
    records = [record_from(0, "q1", "A", choices=["x", "y"], type="t1"),
               record_from(1, "q2", "y", choices=["x", "y"], type="t2"),
               record_from(2, "q3", "B", choices=["x", "y"], type="t2")]
    result = score(records, ["A", "x", "B"])
    assert result.accuracy == pytest.approx(2 / 3) and result.per_type == {"t1": 1.0, "t2": 0.5}
    messages = prompt_messages(records[0], "multiple_choice")
    assert messages[0]["content"][-1]["text"].startswith("q1\nA. x\nB. y")
    assert records[0].messages[0]["content"][-1]["text"] == "q1"  # the record itself is unchanged
    with pytest.raises(DataError, match="record 0: answer 'Z'"):
        score([record_from(0, "q", "Z", choices=["x", "y"])], ["A"])
