"""Sweeps: a grid of recipes run as one group of background jobs, and the Pareto front of what they measured.

A sweep spec (YAML) is a base recipe plus axes over recipe keys::

    name: reference-grid              # every run's name starts with it
    base:                             # a recipe (see recipes/); every point starts from it
      model: reference
      recovery: {max_steps: 40}
      data: {train: {source: shapes, fraction: 0.05}, eval: {source: shapes, samples: 200}}
    axes:                             # the grid is the product of the axes, in the order written
      prune.method: [layer, width]    # a dotted recipe key (any depth: data.eval.samples) and its values
      prune.ratio: [0.15, 0.3, 0.4]
      recovery: [none, sft+hidden]    # a whole section: a named preset (RECOVERY_PRESETS) or a mapping

Each point is validated as a :class:`~compression.runs.recipe.Recipe`; the points are queued in
one transaction by ``compression.runs.jobs.submit_sweep`` (one runner for everything: a sweep is
a group of ordinary jobs, cancelled and resumed as one), and they share the original's
importance scores and accuracy (``compression.runs.shared``).

The front: a point is on the Pareto front when no other point costs at most as much (weights on
disk, or prefill latency) with at least the accuracy, and is strictly better in one of the two.
Equal points stay on the front together. The original model is one of the points. The grid follows
Huang et al. (arXiv 2507.20749), who report accuracy kept against the share removed for each pruning
paradigm and recovery; the front is the choice among such a grid's measured points.
"""
from __future__ import annotations

import copy
import functools
import itertools
import json
import math
import re
import statistics
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import yaml
from pydantic import BaseModel

from compression.runs import jobs
from compression.runs.recipe import Recipe, RecipeError, _safe_name

MAX_RUNS = 200  # a larger grid needs --yes (CLI) or a ticked box (UI)

# Recovery presets, named as the paper names its recoveries; learning rates as in
# benchmarks/bench_recovery.py (adapters start from scratch and take larger steps than full finetuning).
RECOVERY_PRESETS: dict[str, dict[str, Any]] = {
    "none": {"mode": "none", "distillation": "none"},
    "projector": {"mode": "projector", "distillation": "none", "learning_rate": 1e-3},
    "lora": {"mode": "lora", "distillation": "none", "learning_rate": 1e-3},
    "sft": {"mode": "full", "distillation": "none", "learning_rate": 2e-4},
    "sft+hidden": {"mode": "full", "distillation": "hidden", "learning_rate": 2e-4},
    "sft+logits": {"mode": "full", "distillation": "logits", "learning_rate": 2e-4},
}
PRESETS = {"recovery": RECOVERY_PRESETS}


class SweepError(ValueError):
    """A sweep spec that cannot be run; the message is one line naming the value and what was expected."""


def _section(annotation: Any) -> type[BaseModel] | None:
    """The pydantic model a field holds (``DataUse | None`` -> ``DataUse``), else None (a value)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return next((a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)), None)


def axis_target(axis: str) -> type[BaseModel] | None:
    """Check that ``axis`` names a recipe key (``prune.ratio``, ``data.eval.samples``, or a whole
    section such as ``recovery``); returns the section's model, or None for a value. One-line error."""
    if axis == "name":
        raise SweepError("sweep axis name: runs are named by the sweep; expected another recipe key")
    model: type[BaseModel] = Recipe
    parts = axis.split(".")
    for depth, part in enumerate(parts):
        fields = [f for f in model.model_fields if not (model is Recipe and f == "name")]
        if part not in fields:
            prefix = ".".join(parts[:depth])
            choices = ", ".join(f"{prefix}.{f}" if prefix else f for f in fields)
            more = " or a dotted key such as prune.ratio" if not prefix else ""
            raise SweepError(f"sweep axis {axis}: unknown recipe key; expected one of {choices}{more}")
        section = _section(model.model_fields[part].annotation)
        if depth == len(parts) - 1:
            return section
        if section is None:
            raise SweepError(f"sweep axis {axis}: {'.'.join(parts[:depth + 1])} is a value, not a section; "
                             "expected a key below a section, e.g. prune.ratio")
        model = section
    return None


# ------------------------------------------------------------------------------------------- the spec

@dataclass(frozen=True)
class Point:
    """One run of the grid: its axis values as written and the validated recipe."""
    index: int
    values: dict[str, Any]
    recipe: Recipe

    @property
    def label(self) -> str:
        return " · ".join(_token(v) for v in self.values.values())

    @property
    def run_name(self) -> str:
        assert self.recipe.name is not None
        return self.recipe.name


@dataclass
class SweepSpec:
    name: str
    base: dict[str, Any] = field(default_factory=dict)
    axes: dict[str, list[Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _safe_name(self.name) or len(self.name) > 40:
            raise SweepError(f"sweep name {self.name!r}: expected a plain name of at most 40 letters, digits, "
                             "'.', '_' or '-'")
        # The base alone need not be a whole recipe (an axis may give its prune.ratio); each point is validated.
        if not isinstance(self.base, dict):
            raise SweepError(f"sweep base: got a {type(self.base).__name__}; expected a mapping of recipe fields")
        if not isinstance(self.axes, dict) or not self.axes:
            raise SweepError("sweep spec has no axes; expected e.g. axes: {prune.ratio: [0.15, 0.3]}")
        for axis, values in self.axes.items():
            _check_axis(str(axis), values)

    # ------------------------------------------------------------------ YAML

    @classmethod
    def from_dict(cls, raw: Any, source: str = "sweep spec") -> "SweepSpec":
        if not isinstance(raw, dict):
            raise SweepError(f"{source}: got a {type(raw).__name__}; expected a mapping with name, base and axes")
        unknown = [k for k in raw if k not in ("name", "base", "axes")]
        if unknown:
            raise SweepError(f"{source}: unknown key {unknown[0]!r}; expected name, base and axes")
        return cls(name=raw.get("name", "sweep"), base=raw.get("base") or {}, axes=raw.get("axes") or {})

    @classmethod
    def from_yaml(cls, text_or_path: str | Path) -> "SweepSpec":
        """A spec from YAML text or a ``.yaml`` file path."""
        source, text = "sweep spec", text_or_path
        if isinstance(text_or_path, Path) or (isinstance(text_or_path, str) and "\n" not in text_or_path
                                               and text_or_path.endswith((".yaml", ".yml"))):
            path = Path(text_or_path)
            if not path.is_file():
                raise SweepError(f"sweep spec {path} does not exist; expected a YAML file with name, base and axes")
            source, text = f"sweep spec {path.name}", path.read_text()
        try:
            raw = yaml.safe_load(text)
        except yaml.YAMLError as e:
            where = getattr(e, "problem_mark", None)
            line = f" at line {where.line + 1}" if where is not None else ""
            raise SweepError(f"{source} is not valid YAML{line}; expected 'key: value' lines") from None
        return cls.from_dict(raw, source)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "base": self.base, "axes": self.axes}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    # ------------------------------------------------------------------ the grid

    def points(self) -> list[Point]:
        """Every point of the grid, validated; a duplicated point is an error."""
        points, seen = [], {}
        for index, combination in enumerate(itertools.product(*self.axes.values())):
            values = dict(zip(self.axes, combination))
            label = " · ".join(_token(v) for v in combination)
            raw = copy.deepcopy(self.base)
            for axis, value in values.items():
                _set(raw, axis, value)
            raw["name"] = _run_name(self.name, index, combination)
            try:
                recipe = Recipe.from_dict(raw, f"sweep point {index + 1} ({label})")
            except RecipeError as e:
                raise SweepError(str(e)) from None
            identity = json.dumps({**recipe.to_dict(), "name": None}, sort_keys=True)  # JSON: 20x faster than YAML
            if identity in seen:
                first = seen[identity]
                raise SweepError(f"sweep points {first.index + 1} ({first.label}) and {index + 1} ({label}) are the "
                                 "same recipe; expected each point once (a value is repeated, or one value makes "
                                 "another axis irrelevant)")
            point = Point(index, values, recipe)
            seen[identity] = point
            points.append(point)
        return points


def _check_axis(axis: str, values: Any) -> None:
    section = axis_target(axis)
    if axis == "data" or axis.startswith("data.eval"):
        # accuracies on different records do not compare, and a front across them would mislead
        raise SweepError(f"sweep axis {axis}: every run of a sweep is scored on the same records; expected "
                         "data.eval in the base, not on an axis")
    if not isinstance(values, list):
        raise SweepError(f"sweep axis {axis}: got {values!r}; expected a list of values, e.g. [0.15, 0.3]")
    if not values:
        raise SweepError(f"sweep axis {axis} is empty; expected a list of one or more values")
    presets = PRESETS.get(axis)
    if section is not None and presets is not None:
        for value in values:
            if not (isinstance(value, dict) or (isinstance(value, str) and value in presets)):
                raise SweepError(f"sweep axis {axis}: got {value!r}; expected one of the presets "
                                 f"{', '.join(presets)} or a mapping of {axis} keys")


def _set(raw: dict[str, Any], axis: str, value: Any) -> None:
    """Set one axis value in a raw recipe: a key below sections, or a whole section (merged over the
    base's; a preset name stands for its keys). A data use written as its bare source becomes
    ``{source: ...}`` when a key below it is set."""
    *path, leaf = axis.split(".")
    here = raw
    for part in path:
        below = here.get(part)
        here[part] = dict(below) if isinstance(below, dict) else ({} if below is None else {"source": below})
        here = here[part]
    if isinstance(value, str) and value in PRESETS.get(axis, {}):
        value = PRESETS[axis][value]
    if isinstance(value, dict) and isinstance(here.get(leaf), dict):
        value = {**here[leaf], **value}
    here[leaf] = value


def _token(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_token(v)}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "-".join(_token(v) for v in value)
    return str(value)


def _run_name(sweep: str, index: int, combination: Sequence[Any]) -> str:
    text = re.sub(r"[^A-Za-z0-9._-]+", "-", "-".join(_token(v) for v in combination)).strip("-.")
    return f"{sweep}-{index + 1:02d}-{re.sub(r'[.]{2,}', '.', text)}"[:70].rstrip("-.")


# ------------------------------------------------------------------------------------------- launch, follow

def launch(spec: SweepSpec, yes: bool = False) -> str:
    """Queue every point of ``spec`` as one sweep of background jobs; returns the sweep id."""
    points = spec.points()
    check_count(spec.name, len(points), yes)
    check_budgets(points)
    return jobs.submit_sweep(spec.name, spec.to_yaml(), [(p.run_name, p.recipe) for p in points])


def check_count(name: str, runs: int, yes: bool) -> None:
    """A grid over MAX_RUNS runs is refused unless confirmed."""
    if runs > MAX_RUNS and not yes:
        raise SweepError(f"sweep {name} has {runs} runs, over {MAX_RUNS}; pass --yes (or tick 'launch them all') "
                         "to run them anyway")


def check_budgets(points: Sequence[Point]) -> None:
    """Refuse a point whose pruning budget its model cannot give (e.g. widthwise 50 % when the
    eligible layers hold less), before anything is queued: each distinct budget is planned on the
    model's config alone (``compression.methods.prune.make_plan``; counts need no weights)."""
    for p in points:
        spec = p.recipe.prune
        if spec.method == "none":
            continue
        config = _config_file(p.recipe.model)
        if config is None:
            continue  # a hub id: checked when its run loads it
        version = _file_version(config)
        _config_model(config, version)  # a config that does not load raises its own error here
        problem = _budget_problem(config, version, spec.method, spec.ratio,
                                  None if spec.layer_range is None else tuple(spec.layer_range))
        if problem is not None:
            raise SweepError(f"sweep point {p.index + 1} ({p.label}): {problem}")


def _file_version(path: str) -> tuple[int, int]:
    """``(mtime_ns, size)`` of a config file; ``(0, 0)`` for a shipped ``config:<name>`` (part of the package)."""
    try:
        stat = Path(path).stat()
    except OSError:
        return 0, 0
    return stat.st_mtime_ns, stat.st_size


# The Compress page checks its grid on every rerun: each distinct budget is planned once per config file
# version (its mtime and size are in the key, so an edited config is planned again).
@functools.lru_cache(maxsize=256)
def _budget_problem(config: str, version: tuple[int, int], method: str, ratio: float,
                    layer_range: tuple[int, int] | None) -> str | None:
    """Why ``config``'s model cannot give this pruning budget (one line), or None when it can."""
    from compression.methods import prune

    try:
        prune.make_plan(_config_model(config, version), method, ratio=ratio, layer_range=layer_range)
    except ValueError as e:
        return str(e).splitlines()[0]
    return None


@functools.lru_cache(maxsize=8)
def _config_model(config: str, version: tuple[int, int]):
    """The config-only (meta device) model of ``config``: shapes only, no weights, read-only here."""
    from compression.models import load

    return load(config)


def _config_file(model: str) -> str | None:
    from compression.models.reference import REFERENCE_PATH

    if model == "reference":
        return str(REFERENCE_PATH / "config.json")
    if model.startswith("config:") or model.endswith(".json"):
        return model
    if (Path(model).expanduser() / "config.json").is_file():
        return str(Path(model).expanduser() / "config.json")
    return None


def results(sweep_id: str) -> dict[str, Any]:
    """The sweep as it stands: its jobs, the finished runs with their metrics, and the front."""
    sweep = jobs.get_sweep(sweep_id)
    rows = sorted(jobs.list_jobs(sweep=sweep_id), key=lambda j: (j["created"], j["id"]))
    runs = []
    for job in rows:
        metrics_file = Path(job["run_dir"] or jobs.runs_dir() / job["id"]) / "metrics.json"
        if job["state"] == "succeeded" and metrics_file.is_file():
            metrics = json.loads(metrics_file.read_text())
            runs.append({"name": job["id"], "recipe": metrics.get("recipe"), "metrics": metrics})
    return {"id": sweep_id, "name": sweep["name"], "spec": sweep["spec"], "created": sweep["created"],
            "total": sweep["total"], "finished": sweep["finished"], "counts": sweep["counts"],
            "done": sweep["finished"] == sweep["total"],
            "jobs": [{"name": j["id"], "state": j["state"], "stage": j["stage"], "progress": j["progress"],
                      "error": j["error"]} for j in rows],
            **summarize(runs)}


# ------------------------------------------------------------------------------------------- the front

def pareto_front(points: Sequence[tuple[float | None, float | None]]) -> list[int]:
    """Indices of the ``(cost, quality)`` points no other point dominates (lower cost is better,
    higher quality is better); equal points are all kept; points with a missing value are not on it."""
    valid = [(c, q, i) for i, (c, q) in enumerate(points)
             if c is not None and q is not None and not (math.isnan(c) or math.isnan(q))]
    valid.sort(key=lambda t: (t[0], -t[1]))
    front, best_cheaper = [], -math.inf  # best quality among strictly cheaper points
    for _, group in itertools.groupby(valid, key=lambda t: t[0]):
        group = list(group)
        top = group[0][1]  # the group is sorted by quality, best first
        if top > best_cheaper:
            front += [i for _, q, i in group if q == top]
        best_cheaper = max(best_cheaper, top)
    return sorted(front)


COSTS = {"size": "size_bytes", "prefill_ms": "prefill_ms"}  # front name -> point field


def summarize(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """``runs`` (``{"name", "recipe", "metrics"}``) with the originals they came from and the fronts.

    ``front``: the runs on the accuracy-vs-size front (the original counts as a competitor but is
    not listed); ``fronts``: every point's name on each front, originals included.
    """
    table = points(runs)
    fronts = {name: [table[i]["name"] for i in pareto_front([(p[cost], p["accuracy"]) for p in table])]
              for name, cost in COSTS.items()}
    run_names = {r["name"] for r in runs}
    return {"runs": runs, "originals": [p for p in table if p["kind"] == "original"],
            "front": [n for n in fronts["size"] if n in run_names], "fronts": fronts}


def points(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per run and per distinct original, with what was measured and the what-if beside it.

    The original's accuracy is the same in every run (measured once); its latency is timed in each
    run next to the compressed model, so its point takes the median. The what-if estimates scale the
    measured original by the roofline's after / before ratio, so that they sit on the same axes.
    """
    rows, originals = [], {}
    for run in runs:
        m = run["metrics"]
        recipe = run.get("recipe") or m.get("recipe") or {}
        o, c = m["original"], m["compressed"]
        what_if = m.get("what_if") or {}
        before, after = what_if.get("original") or {}, what_if.get("compressed") or {}
        prune, recovery = recipe.get("prune") or {}, recipe.get("recovery") or {}
        rows.append({
            "name": run["name"], "kind": "run", "model": recipe.get("model", "?"),
            "method": prune.get("method", "none"), "ratio": prune.get("ratio", 0.0),
            "recovery": _recovery_name(recovery), "recipe": describe(recipe),
            "accuracy": c["accuracy"], "accuracy_kept": (m.get("kept") or {}).get("accuracy"),
            "size_bytes": c["size_bytes"], "prefill_ms": c.get("prefill_ms"), "params_total": c["params_total"],
            "size_bytes_estimated": _scaled(o["size_bytes"], _bytes(after), _bytes(before)),
            "prefill_ms_estimated": _scaled(o.get("prefill_ms"), after.get("prefill_ms"), before.get("prefill_ms")),
            "eval_samples": m.get("eval_samples"),
        })
        originals.setdefault(recipe.get("model", "?"), []).append(m)
    table = []
    for model, ms in originals.items():
        o = ms[0]["original"]
        latencies = [x["original"].get("prefill_ms") for x in ms if x["original"].get("prefill_ms")]
        table.append({"name": f"original: {model}", "kind": "original", "model": model, "method": "none",
                      "ratio": 0.0, "recovery": "none", "recipe": "the original, as loaded",
                      "accuracy": statistics.median(x["original"]["accuracy"] for x in ms), "accuracy_kept": 1.0,
                      "size_bytes": o["size_bytes"], "params_total": o["params_total"],
                      "prefill_ms": statistics.median(latencies) if latencies else None,
                      "size_bytes_estimated": None, "prefill_ms_estimated": None,
                      "eval_samples": ms[0].get("eval_samples")})
    return table + rows


def best_within(table: list[dict[str, Any]], max_size_bytes: float | None = None,
                max_prefill_ms: float | None = None, trained: bool = True) -> dict[str, Any] | None:
    """The most accurate measured point within the budget (the smaller on a tie); ``trained=False``
    keeps only points made without recovery training. ``None`` when nothing fits."""
    fits = [p for p in table
            if (max_size_bytes is None or p["size_bytes"] <= max_size_bytes)
            and (max_prefill_ms is None or (p["prefill_ms"] is not None and p["prefill_ms"] <= max_prefill_ms))
            and (trained or p["recovery"] == "none")]
    return max(fits, key=lambda p: (p["accuracy"], -p["size_bytes"])) if fits else None


def describe(recipe: dict[str, Any]) -> str:
    """'layer 30 %, sft+hidden on 5 % (40 steps)' from a recipe dict."""
    prune, recovery = recipe.get("prune") or {}, recipe.get("recovery") or {}
    parts = []
    if prune.get("method", "none") != "none":
        parts.append(f"{prune['method']} {prune['ratio']:.0%}")
    if recovery.get("mode", "none") != "none":
        steps = f", {recovery['max_steps']} steps" if recovery.get("max_steps") else ""
        train = (recipe.get("data") or {}).get("train") or {}
        share = f"{train['fraction']:.0%}" if isinstance(train, dict) and train.get("fraction") else \
            f"{train.get('samples')} records" if isinstance(train, dict) and train.get("samples") else "its data"
        parts.append(f"{_recovery_name(recovery)} on {share}{steps}")
    if recipe.get("quantize", "none") != "none":
        parts.append(recipe["quantize"])
    keep = (recipe.get("visual_tokens") or {}).get("keep_ratio", 1.0)
    if keep < 1:
        parts.append(f"{keep:.0%} visual tokens")
    return ", ".join(parts) or "no compression"


def _recovery_name(recovery: dict[str, Any]) -> str:
    """The preset a recovery section matches by mode and distillation (else 'mode+distillation')."""
    mode, kd = recovery.get("mode", "none"), recovery.get("distillation", "none")
    for name, preset in RECOVERY_PRESETS.items():
        if (preset["mode"], preset["distillation"]) == (mode, kd):
            return name
    return f"{mode}+{kd}"


def _bytes(estimate: dict[str, Any]) -> float | None:
    by_dtype = estimate.get("bytes") or {}
    return by_dtype.get("fp32") or next(iter(by_dtype.values()), None)


def _scaled(measured: float | None, after: float | None, before: float | None) -> float | None:
    return measured * after / before if measured and after and before else None


# ------------------------------------------------------------------------------------------- estimate

# Used only where nothing has been measured yet; from benchmarks/results/recovery.md and pruning.md
# (the reference model on 2 shared CPU cores): ~0.11 s a recovery step at batch 16.
DEFAULT_SECONDS = {"start": 10.0, "base": 20.0, "step": 0.12, "question": 0.03}


@dataclass(frozen=True)
class Estimate:
    runs: int
    seconds: float
    basis: str

    def __str__(self) -> str:
        return f"{self.runs} run{'s' * (self.runs != 1)}, about {human_seconds(self.seconds)} ({self.basis})"


@functools.lru_cache(maxsize=64)
def _source_size(source: str, role: str) -> int | None:
    """Records in a data source (``source`` as YAML text, for the cache); None when it cannot be opened."""
    from compression.data.sources import open_source

    try:
        return len(open_source(yaml.safe_load(source), role))
    except (ValueError, OSError):
        return None


def records_used(use: Any, role: str) -> int | None:
    """How many records a recipe's data use (``recipe.data.train`` etc.) picks: ``samples``, or its
    ``fraction`` of the source (at least one); None when unknown."""
    if use is None:
        return None
    if use.samples is not None:
        return use.samples
    size = _source_size(yaml.safe_dump(use.source), role)
    return max(1, round(size * use.fraction)) if size is not None and use.fraction is not None else None


def recovery_steps(recipe: Recipe) -> int:
    """Optimizer steps the recipe's recovery takes (as compression.methods.recover.batch_schedule
    counts them: the last incomplete batch dropped, capped by max_steps)."""
    spec = recipe.recovery
    if spec.mode == "none":
        return 0
    n = records_used(recipe.data.train, "train")
    steps = max(1, (n or spec.batch_size) // spec.batch_size) * spec.epochs
    return min(steps, spec.max_steps) if spec.max_steps else steps


def eval_records(recipe: Recipe) -> int:
    return records_used(recipe.data.eval, "eval") or 0


def estimate(points: Sequence[Point], history: Iterable[dict[str, Any]] | None = None) -> Estimate:
    """Wall time of the sweep, from the measured timings of earlier runs of the same model where
    they exist (``history``: metrics dicts; default ``history_metrics()``: this machine's runs
    first, else the shipped studies), else from the stated defaults (DEFAULT_SECONDS).

    A run is modelled as: worker start + a fixed part (load, prune, save, latency) + seconds per
    test question answered + seconds per recovery step (taken from runs with the same recovery
    and, where there are some, the same number of steps, since a short recovery is mostly set-up).
    The original's questions are counted once per model and question count (measured once, shared).
    """
    history = list(history_metrics() if history is None else history)
    total, bases = 0.0, []
    for model in dict.fromkeys(p.recipe.model for p in points):
        mine = [p for p in points if p.recipe.model == model]
        same = [m for m in history if (m.get("recipe") or {}).get("model") == model and (m.get("timings") or {})]
        runs = [m for m in same if not m.get("from_study")] or same  # this machine's own runs first
        rates, basis = _rates(runs)
        bases.append(f"{model}: {basis}")
        total += sum(rates["question"] * n for n in dict.fromkeys(eval_records(p.recipe) for p in mine))
        for p in mine:
            total += (rates["start"] + rates["base"] + rates["question"] * eval_records(p.recipe)
                      + _recovery_seconds(p.recipe, runs))
    return Estimate(len(points), total / len(jobs.slots()), "; ".join(bases))  # runs spread over the slots


def _rates(runs: list[dict[str, Any]]) -> tuple[dict[str, float], str]:
    measured: dict[str, list[float]] = {"start": [], "base": [], "question": []}
    for m in runs:
        t, e = m["timings"], m.get("evaluation") or {}
        if m.get("job_wall_s") and t.get("total_s"):
            measured["start"].append(max(0.0, m["job_wall_s"] - t["total_s"]))
        if "accuracy_s" in e and "total_s" in t:  # older runs did not time accuracy apart from latency
            measured["base"].append(t["total_s"] - t.get("recover_s", 0) - e["accuracy_s"])
            if e.get("questions_answered"):
                measured["question"].append(e["accuracy_s"] / e["questions_answered"])
    rates = {k: statistics.median(v) if v else DEFAULT_SECONDS[k] for k, v in measured.items()}
    if not runs:
        return rates, (f"default: no finished run of this model to measure from; {DEFAULT_SECONDS['start']:.0f} s to "
                       f"start a worker + {DEFAULT_SECONDS['base']:.0f} s a run + {DEFAULT_SECONDS['step']} s a "
                       f"recovery step + {DEFAULT_SECONDS['question']} s a test question")
    defaults = [k for k, v in measured.items() if not v]
    source = "in the shipped study" if all(m.get("from_study") for m in runs) else "here"
    return rates, (f"measured: medians of {len(runs)} earlier runs {source}"
                   + (f"; default for {', '.join(defaults)}" if defaults else ""))


def _recovery_seconds(recipe: Recipe, runs: list[dict[str, Any]]) -> float:
    """Seconds a step, times the recipe's steps; from runs with the same recovery and step count,
    else the same recovery, else any recovery, else the default."""
    steps = recovery_steps(recipe)
    if not steps:
        return 0.0
    kind = (recipe.recovery.mode, recipe.recovery.distillation)
    timed = [(r["steps"], r["seconds"], (r.get("mode"), r.get("distillation")))
             for r in (m.get("recovery") or {} for m in runs) if r.get("steps") and r.get("seconds")]
    alike = [t for t in timed if t[2] == kind]
    for group in ([t for t in alike if t[0] == steps], alike, timed):
        if group:
            return statistics.median(s / n for n, s, _ in group) * steps
    return DEFAULT_SECONDS["step"] * steps


def history_metrics() -> list[dict[str, Any]]:
    """Metrics of the finished runs here (with the worker's wall time where a job made them),
    then those of the shipped studies (marked ``from_study``)."""
    from compression.runs import studies

    walls = {j["id"]: j["finished"] - j["started"] for j in jobs.list_jobs()
             if j["state"] == "succeeded" and j.get("started") and j.get("finished")}
    local = [{**r["metrics"], "job_wall_s": walls.get(r["name"])} for r in jobs.list_runs()]
    return local + [{**r["metrics"], "job_wall_s": r.get("job_wall_s"), "from_study": True}
                    for s in studies.shipped() for r in s["runs"]]


def human_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 90:
        return f"{seconds} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
