"""Scoring generations against the data's answers: the metric is chosen from the data's fields.

- ``exact_match``: normalised exact match with the VQAv2 evaluation's answer normalisation (lower case,
  punctuation stripped except inside numbers, number words to digits, articles and filler removed,
  common contractions restored; after ``vqaEval.py`` of the VQA API), overall and per ``type``;
- ``multiple_choice``: the choices are rendered into the prompt as lmms-eval's ScienceQA / MMBench tasks
  do (``A. ...`` lines and "Answer with the option's letter from the given choices directly."), the answer
  letter is extracted from the generation (a leading letter, ``(B)``, "answer is C", or the text of a
  choice); the reference answer may be a letter, a choice's text or its index;
- ``yes_no``: accuracy, precision, recall and F1 with "yes" as the positive class, and the yes ratio, as
  POPE reports them.

``auto`` picks ``multiple_choice`` when records carry choices, ``yes_no`` when every answer is yes or no,
else ``exact_match``. Scoring takes strings only: this module knows nothing of models.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal, Sequence

from compression.data.records import DataError, Record

Metric = Literal["auto", "exact_match", "multiple_choice", "yes_no"]
METRICS = ("auto", "exact_match", "multiple_choice", "yes_no")
CHOICE_INSTRUCTION = "Answer with the option's letter from the given choices directly."

_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
_CONTRACTIONS = {"arent": "aren't", "cant": "can't", "couldnt": "couldn't", "didnt": "didn't", "doesnt": "doesn't",
                 "dont": "don't", "hadnt": "hadn't", "hasnt": "hasn't", "havent": "haven't", "isnt": "isn't",
                 "itd": "it'd", "itll": "it'll", "im": "i'm", "ive": "i've", "shouldnt": "shouldn't",
                 "thats": "that's", "theres": "there's", "theyre": "they're", "wasnt": "wasn't", "werent": "weren't",
                 "whats": "what's", "wont": "won't", "wouldnt": "wouldn't", "youre": "you're"}
_PUNCTUATION = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!", "*", "#", "^", "&", "%", "$", ":", "~"]
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(text: str) -> str:
    """VQAv2-style normalisation: ``"Two dogs."`` -> ``"2 dogs"``, ``"The Red one"`` -> ``"red 1"``."""
    text = text.replace("\n", " ").replace("\t", " ").strip().lower()
    for p in _PUNCTUATION:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_STRIP.sub("", text)
    words = []
    for word in text.split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# ----------------------------------------------------------------------------------------------- choices

def letters(n: int) -> list[str]:
    if n > 26:
        raise DataError(f"{n} choices; expected at most 26 (A-Z)")
    return [chr(ord("A") + i) for i in range(n)]


def render_choices(question: str, choices: Sequence[str]) -> str:
    """The question with its options, as lmms-eval's ScienceQA / MMBench prompts put them."""
    options = "\n".join(f"{letter}. {choice}" for letter, choice in zip(letters(len(choices)), choices))
    return f"{question.strip()}\n{options}\n{CHOICE_INSTRUCTION}"


def answer_letter(answer: str, choices: Sequence[str]) -> str | None:
    """The reference answer as a letter: given as a letter, as the text of a choice, or as an index."""
    text = answer.strip()
    valid = letters(len(choices))
    if text.upper() in valid and len(text) == 1:
        return text.upper()
    if text.isdigit() and int(text) < len(choices):
        return valid[int(text)]
    for letter, choice in zip(valid, choices):
        if normalize_answer(choice) == normalize_answer(text):
            return letter
    return None


_LEADING_LETTER = re.compile(r"^\(?([A-Z])(?:[.):\]]|\s|$)")
_ANSWER_IS = re.compile(r"answer(?: is|:)\s*\(?([A-Z])\b", re.I)


def extract_letter(prediction: str, choices: Sequence[str]) -> str | None:
    """The option a generation picked: a leading letter (``B``, ``(B)``, ``B.``), "answer is B", or a choice's text."""
    text = prediction.strip()
    valid = letters(len(choices))
    lone = text.strip("().: ")
    if len(lone) == 1 and lone.upper() in valid:  # "b", "(B)", "B." — a lone letter, whatever its case
        return lone.upper()
    m = _LEADING_LETTER.match(text)
    if m and m.group(1) in valid:
        return m.group(1)
    m = _ANSWER_IS.search(text)
    if m and m.group(1).upper() in valid:
        return m.group(1).upper()
    normalized = normalize_answer(text)
    for letter, choice in zip(valid, choices):
        if normalized and normalized == normalize_answer(choice):
            return letter
    return None


def yes_no(text: str) -> str | None:
    """``"yes"`` / ``"no"`` from a generation's first yes or no word (POPE's reading), else None."""
    for word in normalize_answer(text).split():
        if word in ("yes", "no"):
            return word
    return None


# ----------------------------------------------------------------------------------------------- scoring

@dataclass
class ScoreResult:
    metric: str
    accuracy: float
    n: int
    per_type: dict[str, float] = field(default_factory=dict)
    details: dict[str, float] = field(default_factory=dict)   # yes_no: precision, recall, f1, yes_ratio
    correct: list[bool] = field(default_factory=list, repr=False)


def choose_metric(records: Sequence[Record], metric: Metric = "auto") -> str:
    """The metric for these records: ``metric`` unless ``auto``, then chosen from the data's fields."""
    if metric not in METRICS:
        raise DataError(f"metric {metric!r}; expected one of {', '.join(METRICS)}")
    if metric != "auto":
        if metric == "multiple_choice":
            missing = next((r for r in records if not r.choices), None)
            if missing is not None:
                raise DataError(f"metric multiple_choice: record {missing.index} has no choices")
        return metric
    if records and all(r.choices for r in records):
        return "multiple_choice"
    if records and all(normalize_answer(r.answer) in ("yes", "no") for r in records):
        return "yes_no"
    return "exact_match"


def prompt_messages(record: Record, metric: str) -> list[dict]:
    """The messages evaluation generates from: the record's prompt, with the choices rendered for MC."""
    messages = [dict(m) for m in record.prompt_messages]
    if metric == "multiple_choice" and record.choices:
        last = messages[-1]
        content = [dict(p) for p in last["content"]]
        texts = [i for i, p in enumerate(content) if p.get("type") == "text"]
        if texts:
            content[texts[-1]]["text"] = render_choices(content[texts[-1]]["text"], record.choices)
        else:
            content.append({"type": "text", "text": render_choices("", record.choices)})
        messages[-1] = {**last, "content": content}
    return messages


def is_correct(record: Record, prediction: str, metric: str) -> bool:
    if metric == "multiple_choice":
        want = answer_letter(record.answer, record.choices or [])
        if want is None:
            raise DataError(f"record {record.index}: answer {record.answer!r} is neither a letter, an index nor "
                            "the text of one of its choices")
        return extract_letter(prediction, record.choices or []) == want
    if metric == "yes_no":
        return yes_no(prediction) == yes_no(record.answer)
    return normalize_answer(prediction) == normalize_answer(record.answer)


def score(records: Sequence[Record], predictions: Sequence[str], metric: Metric = "auto") -> ScoreResult:
    """Accuracy (and per type, and the yes/no figures) of ``predictions`` against the records' answers."""
    if len(records) != len(predictions):
        raise ValueError(f"{len(predictions)} predictions for {len(records)} records")
    chosen = choose_metric(records, metric)
    correct = [is_correct(r, p, chosen) for r, p in zip(records, predictions)]
    by_type: dict[str, list[bool]] = {}
    for r, ok in zip(records, correct):
        if r.type is not None:
            by_type.setdefault(r.type, []).append(ok)
    details: dict[str, float] = {}
    if chosen == "yes_no":
        truth = [yes_no(r.answer) == "yes" for r in records]
        said = [yes_no(p) == "yes" for p in predictions]
        tp = sum(t and s for t, s in zip(truth, said))
        fp = sum(s and not t for t, s in zip(truth, said))
        fn = sum(t and not s for t, s in zip(truth, said))
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        details = {"precision": precision, "recall": recall,
                   "f1": 2 * precision * recall / (precision + recall) if precision + recall else 0.0,
                   "yes_ratio": sum(said) / len(said) if said else 0.0}
    return ScoreResult(chosen, sum(correct) / len(correct) if correct else 0.0, len(correct),
                       {k: sum(v) / len(v) for k, v in sorted(by_type.items())}, details, correct)
