"""Data sources, one entry point: the built-in ShapesVQA set, LLaVA conversation JSON / JSONL with an image
folder, and Hugging Face datasets on disk. Every step that reads data (calibration, recovery, evaluation,
token maps, Compare) goes through :func:`open_source` and :func:`select`.

A *source* is named by a string or a mapping (the recipe's ``data:`` entries, the CLI's ``--data``):

- ``shapes`` (or ``shapes:test``): the built-in ShapesVQA (``compression.data.shapes``), for the reference model;
- a ``.json`` / ``.jsonl`` file in the LLaVA conversation format of LLaVA-1.5's ``llava_v1_5_mix665k.json``:
  ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."}, {"from": "gpt", ...}, ...]}``,
  multi-turn, ``<image>`` anywhere in a human turn, ``image`` a path or a list of paths relative to the
  image root (default: the file's folder), text-only records (no ``image``) allowed;
- a Hugging Face dataset on disk: a ``save_to_disk`` folder (``datasets.load_from_disk``), or parquet /
  JSON / CSV files with an image column (``datasets.load_dataset``); columns are mapped with
  ``columns: {image, question, answer, choices, type, id}`` when their names differ;
- a mapping ``{path, image_root, columns, split}`` for any of these.

Reading is lazy: only the records a step selects are parsed and their images decoded. A LLaVA JSON file
is indexed once by byte offsets (a scan for the top-level record boundaries over a memory map, cached by
the file's size and modification time), so a 5 % fraction of a 665k-record mix decodes 5 % of the images.
The ``datasets`` library is the lazy reader for datasets on disk (Arrow, memory-mapped; an ``Image``
column decodes on row access). We do not read LLaVA JSON through ``datasets.load_dataset("json")``: it
parses the whole file into Arrow first and its schema inference breaks on text-only records.

Every problem is one line naming the source, the record index and what was expected: a missing or
unreadable image, an image path that leaves the image root, a record without an answer, a count of
``<image>`` that does not match the images. Bad records are refused (default) or skipped with a count.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

import numpy as np
from PIL import Image, UnidentifiedImageError

from compression.data.records import IMAGE_PLACEHOLDER, DataError, Record, image_count, parts_from_text, record_from

Role = Literal["calibration", "train", "eval"]
OnError = Literal["refuse", "skip"]
SHAPES = "shapes"
COLUMN_KEYS = ("image", "question", "answer", "choices", "type", "id")
_SHAPES_SPLIT = {"calibration": "train", "train": "train", "eval": "test"}
_TABULAR_SUFFIXES = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


# ----------------------------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class SourceSpec:
    """What a user names as data. ``path`` is ``shapes``, a file or a folder; the rest is optional."""

    path: str
    image_root: str | None = None
    columns: tuple[tuple[str, str], ...] = ()
    split: str | None = None

    @classmethod
    def parse(cls, value: "str | dict | SourceSpec") -> "SourceSpec":
        """From a recipe / CLI value: a string, or a mapping ``{path, image_root, columns, split}``."""
        if isinstance(value, SourceSpec):
            return value
        if isinstance(value, str):
            text = value.strip()
            if not text:
                raise DataError("data source is empty; expected 'shapes', a .json/.jsonl file or a datasets folder")
            if text.startswith(SHAPES + ":"):
                return cls(SHAPES, split=text.split(":", 1)[1] or None)
            return cls(text)
        if not isinstance(value, dict):
            raise DataError(f"data source {value!r} is a {type(value).__name__}; expected a path string or a "
                            "mapping {path, image_root, columns, split}")
        unknown = set(value) - {"path", "image_root", "columns", "split"}
        if unknown:
            raise DataError(f"data source key {sorted(unknown)[0]!r} is unknown; expected path, image_root, "
                            "columns, split")
        if not isinstance(value.get("path"), str) or not value["path"].strip():
            raise DataError(f"data source {value!r} has no 'path'; expected a path string")
        columns = value.get("columns") or {}
        if not isinstance(columns, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                    for k, v in columns.items()):
            raise DataError(f"data source columns {columns!r}; expected a mapping such as "
                            "{question: prompt, answer: label}")
        bad = set(columns) - set(COLUMN_KEYS)
        if bad:
            raise DataError(f"data source column {sorted(bad)[0]!r} is unknown; expected some of "
                            f"{', '.join(COLUMN_KEYS)}")
        split = value.get("split")
        spec = cls.parse(value["path"])
        return cls(spec.path, value.get("image_root"), tuple(sorted(columns.items())), split or spec.split)

    def to_value(self) -> str | dict:
        """The recipe form: a plain string when nothing but the path is set."""
        if not (self.image_root or self.columns or self.split):
            return self.path
        out: dict[str, Any] = {"path": self.path}
        if self.image_root:
            out["image_root"] = self.image_root
        if self.columns:
            out["columns"] = dict(self.columns)
        if self.split:
            out["split"] = self.split
        return out

    @property
    def label(self) -> str:
        """A short name for captions: ``test.json``, ``shapes (test)``."""
        if self.path == SHAPES:
            return f"ShapesVQA ({self.split})" if self.split else "ShapesVQA"
        return Path(self.path).name + (f" ({self.split})" if self.split else "")


# ----------------------------------------------------------------------------------------------- sources

class DataSource:
    """A sequence of records, read lazily. Subclasses implement ``__len__``, ``_read(i)`` and ``fingerprint``."""

    spec: SourceSpec
    role: Role

    def __len__(self) -> int:
        raise NotImplementedError

    def _read(self, index: int) -> Record:
        raise NotImplementedError

    def fingerprint(self) -> str:
        raise NotImplementedError

    @property
    def label(self) -> str:
        return self.spec.label

    def record(self, index: int) -> Record:
        """Record ``index``, its images decoded; raises :class:`DataError` naming it."""
        self._in_range(index)
        return self._read(index)

    def check(self, index: int) -> int:
        """Validate record ``index`` without keeping its images decoded; returns how many images it has."""
        self._in_range(index)
        return self._check(index)

    def _check(self, index: int) -> int:
        return len(self._read(index).images)

    def _in_range(self, index: int) -> None:
        if not 0 <= index < len(self):
            raise DataError(f"record {index} of {self.label} does not exist; the source holds {len(self)} records")

    def _bad(self, index: int, reason: str) -> DataError:
        return DataError(f"record {index} of {self.label}: {reason}")


class ShapesSource(DataSource):
    """The built-in ShapesVQA set (generated, deterministic). ``split`` defaults by role: eval -> test."""

    def __init__(self, spec: SourceSpec, role: Role):
        from compression.data import shapes

        self.spec = SourceSpec(SHAPES, split=spec.split or _SHAPES_SPLIT[role])
        self.role = role
        if self.spec.split not in shapes.SPLIT_SIZES:
            raise DataError(f"ShapesVQA split {self.spec.split!r}; expected one of {', '.join(shapes.SPLIT_SIZES)}")
        self._shapes = shapes

    def __len__(self) -> int:
        return self._shapes.SPLIT_SIZES[self.spec.split]

    def _check(self, index: int) -> int:
        return 1  # every generated scene has its image

    def _read(self, index: int) -> Record:
        s = self._shapes.generate(self.spec.split, index)
        return record_from(index, s.question, s.answer, s.image, type=s.qtype, id=s.id)

    def fingerprint(self) -> str:
        return f"shapes-{self.spec.split}-seed0"


class LlavaJsonSource(DataSource):
    """LLaVA conversation JSON (a list of records) or JSON Lines, indexed by byte offsets."""

    def __init__(self, spec: SourceSpec, role: Role):
        self.spec, self.role = spec, role
        self.path = Path(spec.path).expanduser()
        self.root = Path(spec.image_root).expanduser() if spec.image_root else self.path.parent
        if spec.image_root and not self.root.is_dir():
            raise DataError(f"image root {self.root} is not a folder; expected the folder the records' image "
                            "paths are relative to")
        self._offsets = _record_offsets(self.path)

    def __len__(self) -> int:
        return len(self._offsets) - 1 if len(self._offsets) else 0

    def fingerprint(self) -> str:
        return _file_fingerprint(self.path)

    def raw(self, index: int) -> Any:
        start, end = int(self._offsets[index]), int(self._offsets[index + 1])
        with open(self.path, "rb") as f:
            f.seek(start)
            chunk = f.read(end - start)
        try:
            text = chunk.decode("utf-8").strip().strip(",").strip()
        except UnicodeDecodeError:
            raise self._bad(index, "is not UTF-8 text") from None
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise self._bad(index, f"is not valid JSON ({e.msg})") from None

    def _check(self, index: int) -> int:
        record, paths = self._parse(index)
        for p in paths:
            _open_image(self.root, p, lambda reason: self._bad(index, reason), decode=False)
        return len(paths)

    def _read(self, index: int) -> Record:
        record, paths = self._parse(index)
        record.images = [_open_image(self.root, p, lambda reason: self._bad(index, reason)) for p in paths]
        return record

    def _parse(self, index: int) -> tuple[Record, list[str]]:
        """The record without its images decoded, and its image paths (validated as text)."""
        raw = self.raw(index)
        if not isinstance(raw, dict):
            raise self._bad(index, f"is a {type(raw).__name__}; expected an object with 'conversations'")
        conv = raw.get("conversations")
        if not isinstance(conv, list) or not conv:
            raise self._bad(index, "has no 'conversations' list; expected [{'from': 'human', 'value': ...}, "
                                   "{'from': 'gpt', 'value': ...}, ...]")
        messages = []
        for t, turn in enumerate(conv):
            if not isinstance(turn, dict) or not isinstance(turn.get("value"), str):
                raise self._bad(index, f"turn {t} is not {{'from': ..., 'value': <text>}}")
            role = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                    "system": "system"}.get(str(turn.get("from")).lower())
            if role is None:
                raise self._bad(index, f"turn {t} is from {turn.get('from')!r}; expected 'human', 'gpt' or 'system'")
            if role == "assistant" and IMAGE_PLACEHOLDER in turn["value"]:
                raise self._bad(index, f"turn {t} (gpt) holds {IMAGE_PLACEHOLDER}; images belong in human turns")
            parts = parts_from_text(turn["value"]) if role == "user" else [
                {"type": "text", "text": turn["value"].strip()}]
            messages.append({"role": role, "content": parts})
        _check_turns(messages, lambda reason: self._bad(index, reason))
        paths = raw.get("image", raw.get("images"))
        paths = [] if paths in (None, "", []) else [paths] if isinstance(paths, str) else paths
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise self._bad(index, f"'image' is {paths!r}; expected a path or a list of paths")
        placeholders = image_count(messages)
        if placeholders != len(paths):
            if placeholders == 0 and len(paths) == 1:  # LLaVA's loader puts a lone image first in the first turn
                first = next(m for m in messages if m["role"] == "user")
                first["content"].insert(0, {"type": "image"})
            else:
                raise self._bad(index, f"holds {placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but {len(paths)} "
                                       "image(s); expected one placeholder per image")
        choices = raw.get("choices", raw.get("options"))
        if choices is not None and (not isinstance(choices, list) or not all(isinstance(c, str) for c in choices)):
            raise self._bad(index, f"'choices' is {choices!r}; expected a list of strings")
        qtype = raw.get("type", raw.get("question_type", raw.get("category")))
        return Record(index, str(raw.get("id", index)), messages, [], choices,
                      str(qtype) if qtype is not None else None), paths


class DatasetSource(DataSource):
    """A Hugging Face dataset on disk: a ``save_to_disk`` folder, or parquet / JSON / CSV files."""

    def __init__(self, spec: SourceSpec, role: Role):
        self.spec, self.role = spec, role
        self.path = Path(spec.path).expanduser()
        self.columns = {k: k for k in COLUMN_KEYS} | dict(spec.columns)
        self.root = Path(spec.image_root).expanduser() if spec.image_root else (
            self.path if self.path.is_dir() else self.path.parent)
        self.dataset = _open_dataset(self.path, spec.split, role)
        names = set(self.dataset.column_names)
        for key in ("question", "answer"):
            if self.columns[key] not in names:
                raise DataError(f"{self.label} has no column {self.columns[key]!r} for the {key}; columns are "
                                f"{', '.join(sorted(names))} (map them with columns: {{{key}: <name>}})")
        self._has_image_column = self.columns["image"] in names

    def __len__(self) -> int:
        return len(self.dataset)

    def fingerprint(self) -> str:
        fp = getattr(self.dataset, "_fingerprint", None)
        return f"datasets-{fp}" if fp else _file_fingerprint(self.path)

    def _read(self, index: int) -> Record:
        row = self.dataset[index]
        c = self.columns
        question, answer = row.get(c["question"]), row.get(c["answer"])
        if not isinstance(question, str) or not question.strip():
            raise self._bad(index, f"column {c['question']!r} is {question!r}; expected the question text")
        if isinstance(answer, (int, float)) and not isinstance(answer, bool):
            answer = str(answer)
        if not isinstance(answer, str) or not answer.strip():
            raise self._bad(index, f"has no answer (column {c['answer']!r} is {answer!r}); expected text")
        if IMAGE_PLACEHOLDER in question:
            question = question.replace(IMAGE_PLACEHOLDER, " ").strip()
        image = None
        if self._has_image_column and row.get(c["image"]) is not None:
            image = _image_value(row[c["image"]], self.root, lambda reason: self._bad(index, reason))
        choices = row.get(c["choices"])
        if choices is not None and not (isinstance(choices, list) and all(isinstance(x, str) for x in choices)):
            raise self._bad(index, f"column {c['choices']!r} is {choices!r}; expected a list of strings")
        qtype = row.get(c["type"])
        ident = row.get(c["id"], index)
        answer_text = answer.strip()
        if choices and len(answer_text) == 1 and answer_text.isdigit():  # ScienceQA stores the choice index
            answer_text = chr(ord("A") + int(answer_text))
        return record_from(index, question, answer_text, image, choices=choices or None,
                           type=str(qtype) if qtype is not None else None, id=str(ident))


_LLAVA_ROLE = {"user": "human", "assistant": "gpt"}


def _check_turns(messages: list[dict], bad: Callable[[str], DataError]) -> None:
    roles = [m["role"] for m in messages if m["role"] != "system"]
    if not roles or roles[0] != "user":
        raise bad("the first turn is not from 'human'; expected human, gpt, human, gpt, ...")
    for a, b in zip(roles, roles[1:]):
        if a == b:
            raise bad(f"two {_LLAVA_ROLE[a]!r} turns in a row; expected alternating human and gpt turns")
    if roles[-1] != "assistant":
        raise bad("has no answer: the last turn is not from 'gpt'")


def open_source(value: "str | dict | SourceSpec", role: Role = "eval") -> DataSource:
    """The data source a user named; ``role`` picks ShapesVQA's default split (eval -> test, else train)."""
    spec = SourceSpec.parse(value)
    if spec.path == SHAPES:
        return ShapesSource(spec, role)
    path = Path(spec.path).expanduser()
    if not path.exists():
        raise DataError(f"data source {spec.path} does not exist; expected 'shapes', a LLaVA-format .json/.jsonl "
                        "file, or a Hugging Face dataset folder / parquet file")
    if path.is_file() and path.suffix in (".json", ".jsonl") and not spec.columns and _looks_like_llava(path):
        return LlavaJsonSource(spec, role)
    if path.is_dir() or path.suffix in _TABULAR_SUFFIXES:
        return DatasetSource(spec, role)
    raise DataError(f"data source {spec.path} is a {path.suffix or 'file without suffix'}; expected a .json / .jsonl "
                    "(LLaVA format or tabular), .parquet or .csv file, or a datasets folder")


# ----------------------------------------------------------------------------------------------- selection

class Selection:
    """The records one step uses: their indices in the source (each already checked) and what was skipped.

    ``records`` decodes them all (evaluation, calibration: a few hundred); ``selection[i]`` decodes one
    at a time (recovery: a 5 % fraction of a large mix is decoded batch by batch, never all at once).
    """

    def __init__(self, source: DataSource, indices: list[int], skipped: list[str] | None = None,
                 fraction: float | None = None):
        self.source, self.indices, self.skipped, self.fraction = source, indices, skipped or [], fraction
        self._records: list[Record] | None = None

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Record:
        if self._records is not None:
            return self._records[i]
        return self.source.record(self.indices[i])

    @property
    def records(self) -> list[Record]:
        if self._records is None:
            self._records = [self.source.record(i) for i in self.indices]
        return self._records

    def describe(self) -> str:
        """What a figure was measured on: ``200 records of test.json`` (``, 3 skipped``)."""
        text = f"{len(self)} record{'s' if len(self) != 1 else ''} of {self.source.label}"
        if self.fraction is not None:
            text += f" (fraction {self.fraction:g} of {len(self.source):,})"
        if self.skipped:
            text += f", {len(self.skipped)} bad record{'s' if len(self.skipped) != 1 else ''} skipped"
        return text

    def fingerprint(self) -> str:
        h = hashlib.sha1(self.source.fingerprint().encode())
        h.update(np.asarray(self.indices, dtype=np.int64).tobytes())
        return h.hexdigest()[:16]

    def summary(self) -> dict[str, Any]:
        """What a run folder records about its data."""
        return {"source": self.source.spec.to_value(), "label": self.source.label, "records": len(self),
                "source_records": len(self.source), "fraction": self.fraction, "skipped": len(self.skipped),
                "first_skipped": self.skipped[0] if self.skipped else None,
                "source_fingerprint": self.source.fingerprint(), "selection_fingerprint": self.fingerprint(),
                "described": self.describe()}


def select(source: DataSource, samples: int | None = None, fraction: float | None = None, seed: int = 0,
           need_images: bool = False, on_error: OnError = "refuse", order: Literal["first", "random"] = "first",
           exclude: Iterable[int] = ()) -> Selection:
    """Pick and check the records a step uses, reading nothing else.

    ``samples`` records (the first ones, or a seeded random subset with ``order="random"``), or a
    ``fraction`` of the source (always a seeded random subset, at least one record). ``need_images``
    passes over text-only records (evaluation and calibration need an image; training does not). A bad
    record raises :class:`DataError` naming it (``on_error="refuse"``) or is skipped and counted.
    Checking reads a record's text and its images' headers; pixels are decoded when the step uses them.
    """
    if on_error not in ("refuse", "skip"):
        raise DataError(f"on_error {on_error!r}; expected 'refuse' or 'skip'")
    total = len(source)
    if total == 0:
        raise DataError(f"{source.label} holds no records")
    if fraction is not None:
        if not 0 < fraction <= 1:
            raise DataError(f"data fraction {fraction} must be in (0, 1]")
        want = max(1, round(total * fraction))
        order = "random"
    else:
        if samples is None or samples < 1:
            raise DataError(f"samples {samples} must be at least 1")
        want = min(samples, total)
    excluded = set(exclude)
    candidates: Iterable[int]
    if order == "random":
        candidates = (int(i) for i in np.random.default_rng(seed).permutation(total))
    else:
        candidates = iter(range(total))
    chosen, skipped = [], []
    for i in candidates:
        if len(chosen) >= want:
            break
        if i in excluded:
            continue
        try:
            images = source.check(i)
        except DataError as e:
            if on_error == "refuse":
                raise
            skipped.append(str(e))
            continue
        if need_images and not images:
            continue  # text-only records train, but cannot be scored or calibrate an image model
        chosen.append(i)
    if not chosen:
        raise DataError(f"{source.label}: no usable record" + (" with an image" if need_images else "")
                        + (f" ({len(skipped)} skipped; first: {skipped[0]})" if skipped else ""))
    return Selection(source, sorted(chosen) if order == "random" else chosen, skipped, fraction)


# ----------------------------------------------------------------------------------------------- helpers

def _looks_like_llava(path: Path) -> bool:
    """Whether the first record of a JSON / JSONL file has ``conversations`` (else: a tabular file)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    return b'"conversations"' in head


def _file_fingerprint(path: Path) -> str:
    """sha1 of the file's bytes (or of a folder's files' names, sizes and first MB), cached by size and mtime."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _index_dir() / f"{key}.sha1"
    if cached.is_file():
        return cached.read_text().strip()
    h = hashlib.sha1()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(f"{p.name}:{p.stat().st_size}".encode())
        with open(p, "rb") as f:
            if path.is_dir():
                h.update(f.read(1 << 20))
            else:
                for block in iter(lambda: f.read(1 << 24), b""):
                    h.update(block)
    digest = h.hexdigest()[:16]
    _atomic_write(cached, digest.encode())
    return digest


def _index_dir() -> Path:
    from compression.paths import cache_dir

    d = cache_dir() / "data-index"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(payload)
    os.replace(tmp, path)


# a whole string literal (escapes inside it) is one match, so the Python loop sees strings, brackets and commas
_STRUCTURE = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\],]', re.S)


def _record_offsets(path: Path) -> np.ndarray:
    """Byte offsets of the records of a JSON array (``n + 1`` boundaries) or JSON Lines file; cached."""
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    cached = _index_dir() / f"{key}.offsets.npy"
    if cached.is_file():
        return np.load(cached)
    if stat.st_size == 0:
        raise DataError(f"{path} is empty; expected LLaVA-format records")
    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
        first = re.search(rb"\S", mm)
        if first is None:
            raise DataError(f"{path} is empty; expected LLaVA-format records")
        if mm[first.start():first.start() + 1] == b"[":
            offsets = _array_offsets(mm, first.start(), path)
        else:
            offsets = _line_offsets(mm)
    _atomic_write_npy(cached, offsets)
    return offsets


def _array_offsets(mm: mmap.mmap, start: int, path: Path) -> np.ndarray:
    """Boundaries of the top-level elements of a JSON array: a scan of brackets, quotes and top-level commas
    (strings skipped), so element ``i`` is the bytes between boundaries ``i`` and ``i + 1``."""
    bounds = [start + 1]
    depth = 0
    for m in _STRUCTURE.finditer(mm, start + 1):
        token = m.group()
        if token[0] == 34:  # a string: nothing inside it is structure
            continue
        if token in (b"{", b"["):
            depth += 1
        elif token == b"," and depth == 0:
            bounds.append(m.end())
        elif token in (b"}", b"]"):
            if depth == 0:  # the closing bracket of the array
                if len(bounds) == 1 and not mm[start + 1:m.start()].strip():
                    return np.asarray([], dtype=np.int64)
                bounds.append(m.start())
                return np.asarray(bounds, dtype=np.int64)
            depth -= 1
    raise DataError(f"{path} is not valid JSON (the top-level list never closes); expected a list of LLaVA records")


def _line_offsets(mm: mmap.mmap) -> np.ndarray:
    """Boundaries of the non-empty lines of a JSON Lines file."""
    bounds, pos, size = [], 0, len(mm)
    while pos < size:
        end = mm.find(b"\n", pos)
        end = size if end == -1 else end + 1
        if mm[pos:end].strip():
            bounds.append((pos, end))
        pos = end
    if not bounds:
        return np.asarray([], dtype=np.int64)
    starts = [b[0] for b in bounds]
    # contiguous boundaries: blank lines fold into the record before them, so record i is [o[i], o[i+1])
    return np.asarray(starts + [bounds[-1][1]], dtype=np.int64)


def _atomic_write_npy(path: Path, array: np.ndarray) -> None:
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, array)
    os.replace(tmp, path)


def _open_image(root: Path, relative: str, bad: Callable[[str], DataError], decode: bool = True) -> Image.Image | None:
    root = root.resolve()
    path = (root / relative).resolve()
    if not path.is_relative_to(root):
        raise bad(f"image path {relative!r} leaves the image root {root}; expected a path inside it")
    if path.is_dir():
        raise bad(f"image {relative} is a folder; expected an image file under {root}")
    if not path.is_file():
        raise bad(f"image {relative} not found under {root} (set image_root to the images' folder)")
    try:
        with Image.open(path) as im:
            if not decode:  # the header names a format and a size; the pixels are decoded when a batch needs them
                if not im.size or 0 in im.size:
                    raise OSError("no image size in its header")
                return None
            im.load()
            return im.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, Image.DecompressionBombError) as e:
        raise bad(f"image {relative} is not a readable image ({type(e).__name__})") from None


def _image_value(value: Any, root: Path, bad: Callable[[str], DataError]) -> Image.Image:
    """An image cell of a dataset: a decoded PIL image, ``{"bytes", "path"}`` or a path string."""
    import io

    if isinstance(value, Image.Image):
        return value.convert("RGB")
    if isinstance(value, dict) and (value.get("bytes") or value.get("path")):
        if value.get("bytes"):
            try:
                with Image.open(io.BytesIO(value["bytes"])) as im:
                    im.load()
                    return im.convert("RGB")
            except (UnidentifiedImageError, OSError) as e:
                raise bad(f"its image bytes are not a readable image ({type(e).__name__})") from None
        return _open_image(root, value["path"], bad)
    if isinstance(value, str):
        return _open_image(root, value, bad)
    raise bad(f"image cell is a {type(value).__name__}; expected an image, {{bytes, path}} or a path")


def _open_dataset(path: Path, split: str | None, role: Role):
    """``datasets.load_from_disk`` for a saved folder, ``load_dataset`` for data files; one split."""
    import datasets

    from compression.paths import cache_dir

    datasets.disable_progress_bars()
    try:
        if path.is_dir() and ((path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file()
                              or (path / "state.json").is_file()):
            loaded = datasets.load_from_disk(str(path))
        else:
            files = [path] if path.is_file() else sorted(p for p in path.iterdir()
                                                        if p.suffix in _TABULAR_SUFFIXES and p.is_file())
            kinds = {_TABULAR_SUFFIXES[p.suffix] for p in files}
            if not files or len(kinds) != 1:
                raise DataError(f"{path} holds no dataset: expected a save_to_disk folder or parquet / JSON / CSV "
                                "files of one kind")
            loaded = datasets.load_dataset(kinds.pop(), data_files=[str(p) for p in files], split="train",
                                           cache_dir=str(cache_dir() / "datasets"))
    except DataError:
        raise
    except Exception as e:  # noqa: BLE001 - datasets raises many types for one meaning: unreadable
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DataError(f"{path} is not a readable dataset: {first}") from None
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        wanted = split or next((s for s in ({"eval": ("test", "validation", "val")}.get(role, ("train",)))
                                if s in loaded), None)
        if wanted not in loaded:
            raise DataError(f"{path} has splits {', '.join(names)}; name one with split: <name>")
        return loaded[wanted]
    if split and split != "train":
        raise DataError(f"{path} is a single dataset without split {split!r}; remove split or save a DatasetDict")
    return loaded
