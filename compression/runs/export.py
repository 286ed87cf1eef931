"""Export a finished run as a self-contained Hugging Face folder (and a zip for the browser).

The folder holds the weights as safetensors only (never pickle), the config, processor and
tokenizer files, the generation config, the recipe, the metrics and a model card (README.md)
with the original-vs-compressed table and how to load it. A uniformly pruned model loads with
plain transformers (``AutoModelForImageTextToText``); a model with different widths per layer
ships its modeling code and loads with ``trust_remote_code=True``
(``AutoModelForImageTextToText``). Before it becomes visible, the export is reloaded in a fresh
Python process with transformers alone and its logits are checked against the run's model, one model at a
time; a model above a quarter of the free memory is checked offloaded, a few modules in memory at a time.

Method background: Huang et al., arXiv 2507.20749 (pruning and recovery).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from compression.paths import cache_dir

ZIP_LIMIT_BYTES = 200 * 1024 ** 2   # larger exports are not offered as one browser download
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,99}")


def sanitize_name(name: str) -> str:
    """An export or run name that is a plain folder name; anything that could leave the folder
    (``/``, ``..``, a leading dot, control characters) is refused with a one-line message."""
    name = str(name).strip()
    if not _NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"name {name!r} is not allowed; expected a plain folder name of letters, digits, "
                         "'.', '_' or '-' (no '/', no '..', not starting with '.')")
    return name


def resolve_run(run: str | Path) -> Path:
    """A run folder from its name (under ``cache_dir()/runs``) or its path; it must be complete. A model folder
    (``config.json`` at its top: what ``prune --out`` and ``prune --streaming`` write) is accepted as given."""
    text = str(run)
    path = Path(text).expanduser()
    if ".." in path.parts:
        raise ValueError(f"run {text!r} contains '..'; expected a run name or a run folder path")
    if not (os.sep in text or text.startswith((".", "~"))):
        path = cache_dir() / "runs" / sanitize_name(text)
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return path
    if not (path / "model" / "config.json").is_file() or not (path / "metrics.json").is_file():
        raise ValueError(f"run {text!r} is not a finished run folder ({path}); expected model/ and metrics.json "
                         "(see `python -m compression jobs list`), or a model folder with config.json and "
                         "safetensors weights")
    return path


def _model_and_metrics(run: Path) -> tuple[Path, dict[str, Any], bool]:
    """``(model folder, metrics, is a run)``. A bare pruned folder has no measured metrics: its card says what
    its ``pruning_plan.json`` records (method, ratio, scorer, parameters)."""
    if (run / "model" / "config.json").is_file():
        return run / "model", json.loads((run / "metrics.json").read_text()), True
    plan_file = run / "pruning_plan.json"
    plan = json.loads(plan_file.read_text()) if plan_file.is_file() else {}
    metrics: dict[str, Any] = {}
    if plan:
        metrics = {"recipe": {"model": plan.get("source", "?"),
                              "prune": {"method": plan.get("method", "none"), "ratio": plan.get("ratio_requested", 0),
                                        "scorer": plan.get("scorer")}},
                   "original": {"params_total": plan.get("params_before"),
                                "params_language": plan.get("language_params_before")},
                   "compressed": {"params_total": plan.get("params_after"),
                                  "params_language": plan.get("language_params_after")}}
    return run, metrics, False


def resolve_destination(to: str | Path) -> Path:
    """A bare name goes under ``cache_dir()/exports``; a path is used as given, but its last part
    must be a plain name and it may not contain ``..``."""
    text = str(to)
    if os.sep not in text and not text.startswith("~"):
        return cache_dir() / "exports" / sanitize_name(text)
    path = Path(text).expanduser()
    if ".." in path.parts:
        raise ValueError(f"export path {text!r} contains '..'; expected a folder path without parent references")
    sanitize_name(path.name)
    return path.absolute()


def export_run(run_dir: str | Path, to_dir: str | Path, overwrite: bool = False, make_zip: bool = True,
               verify: bool = True, check_budget_bytes: int | None | str = "auto") -> Path:
    """Write the export folder ``to_dir`` for run ``run_dir`` (a name or a path); returns its path.

    Refuses an existing destination unless ``overwrite``. ``<to_dir>.zip`` is written too when the
    export is under 200 MB. Raises ``ValueError`` (one line) if the reloaded export's logits differ.
    ``check_budget_bytes``: the memory the check may keep weights in (``verify_export``'s ``budget``); what the
    check did is written to ``export_check.json`` in the folder.
    """
    run = resolve_run(run_dir)
    dest = resolve_destination(to_dir)
    zip_path = dest.with_name(dest.name + ".zip")
    if dest.exists() and not overwrite:
        raise ValueError(f"export folder {dest} already exists; expected a new name (or overwrite=True / --overwrite)")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.parent / f".{dest.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model, metrics, is_run = _model_and_metrics(run)
        remote_code = _copy_model(model, tmp)
        shipped_template = _ship_chat_template(tmp)
        if is_run:
            shutil.copyfile(run / "metrics.json", tmp / "metrics.json")
        if (run / "recipe.yaml").is_file():
            shutil.copyfile(run / "recipe.yaml", tmp / "recipe.yaml")
        (tmp / "README.md").write_text(model_card(metrics, dest.name, remote_code, shipped_template))
        if verify:
            check: dict[str, Any] = {}
            difference, same_answer = verify_export(model, tmp, remote_code, budget=check_budget_bytes,
                                                    details=check)
            if difference > 1e-4:
                raise ValueError(f"export check failed: the reloaded model's logits differ from the run's by "
                                 f"{difference:.2e} (max |diff|); expected <= 1e-4")
            if not same_answer:
                raise ValueError("export check failed: the reloaded model's greedy answer differs from the run's")
            (tmp / "export_check.json").write_text(json.dumps(check, indent=1))
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if zip_path.exists() and overwrite:
        zip_path.unlink()
    if make_zip and folder_bytes(dest) < ZIP_LIMIT_BYTES:
        _zip(dest, zip_path)
    return dest


def check_summary(export_dir: str | Path) -> str | None:
    """One line on the export's reload check (its ``export_check.json``), or None for an export without one."""
    f = Path(export_dir) / "export_check.json"
    if not f.is_file():
        return None
    c = json.loads(f.read_text())
    held = ("the whole model in memory" if c["budget_bytes"] is None
            else f"offloaded, at most {c['budget_bytes'] / 1e9:.2f} GB of weights in memory")
    return (f"Checked: reloaded with plain transformers in a fresh process ({c['dtype']}, {held}) in "
            f"{c['reload_seconds']:.0f} s, peak {c['reload_peak_rss'] / 1e9:.2f} GB; {c['new_tokens']} greedy tokens "
            f"the same as the run's, logits within {c['max_logit_difference']:.1e}.")


def zip_path_for(export_dir: str | Path) -> Path | None:
    """The browser-download zip written beside an export, if there is one."""
    p = Path(export_dir)
    z = p.with_name(p.name + ".zip")
    return z if z.is_file() else None


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _copy_model(src: Path, dst: Path) -> bool:
    """Copy the Hugging Face files, never a pickle; returns whether the model needs remote code."""
    dst.mkdir(parents=True)
    config = json.loads((src / "config.json").read_text())
    remote_code = bool(config.get("auto_map"))
    for f in sorted(src.iterdir()):
        if not f.is_file() or f.suffix in PICKLE_SUFFIXES:
            continue
        if f.suffix == ".py" and not remote_code:
            continue
        shutil.copyfile(f, dst / f.name)
    if not any(dst.glob("*.safetensors")):
        _resave_as_safetensors(src, dst)
    return remote_code


def _ship_chat_template(folder: Path) -> bool:
    """A model without a chat template was prompted with the LLaVA-1.5 fallback: write that as its
    ``chat_template.jinja``, so that plain transformers and any tool built on it (lmms-eval's llava_hf)
    prompt the export exactly as the studio measured it. Returns whether it wrote one."""
    from compression.models import load_processor
    from compression.models.prompting import chat_template_of, prompt_format

    from compression.models.loader import _read_config

    processor = load_processor(folder)
    fmt = prompt_format(processor, _read_config(folder / "config.json"))
    if chat_template_of(processor) or fmt.prefix_lm:  # a prefix-LM (PaliGemma) is prompted by its processor alone
        return False
    (folder / "chat_template.jinja").write_text(fmt.template)
    return True


def _resave_as_safetensors(src: Path, dst: Path) -> None:
    """A run folder with pickle weights only (not written by this project): load it, save safetensors."""
    from compression.models import load

    loaded = load(str(src))
    loaded.model.save_pretrained(dst, safe_serialization=True)


def _zip(folder: Path, zip_path: Path) -> None:
    tmp = zip_path.with_name(f".{zip_path.stem}.tmp-{os.getpid()}")
    archive = shutil.make_archive(str(tmp), "zip", root_dir=folder.parent, base_dir=folder.name)
    os.replace(archive, zip_path)


# ------------------------------------------------------------------------------------------- check

# Runs in a fresh interpreter with transformers alone: no project import, exactly what a user does. The
# parent's processor inputs come along: the child checks that its own AutoProcessor makes the same ones, or
# uses them where AutoProcessor cannot be built here (a processor with a video part needs torchvision). With a
# memory budget it loads the way a user loads a model bigger than memory: device_map="auto", max_memory and an
# offload folder (Accelerate moves each offloaded module's weights in for its forward pass).
_RELOAD_SCRIPT = r"""
import sys, json, resource, time, torch
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForImageTextToText as cls, AutoProcessor
folder, image, text, out, remote, given, budget, offload, new_tokens = sys.argv[1:10]
remote = remote == "1"
given = load_file(given)
start = time.perf_counter()
placed = {"device_map": "auto", "max_memory": {"cpu": int(budget)}, "offload_folder": offload} if budget else {}
model = cls.from_pretrained(folder, trust_remote_code=remote, dtype="auto", **placed).eval()  # in the precision it was saved
status = {"class": type(model).__name__, "processor": "loaded",
          "where": sorted({str(v) for v in (getattr(model, "hf_device_map", None) or {"": "cpu"}).values()})}
try:
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=remote)
    inputs = dict(processor(images=[Image.open(image).convert("RGB")], text=[text], return_tensors="pt"))
    status["same_inputs"] = sorted(inputs) == sorted(given) and all(torch.equal(inputs[k], given[k]) for k in given)
except (ImportError, OSError) as e:
    inputs = given
    status["processor"] = (str(e).strip().splitlines() or [type(e).__name__])[0]
with torch.no_grad():
    done = model.generate(**inputs, max_new_tokens=int(new_tokens), do_sample=False, output_logits=True,
                          return_dict_in_generate=True)
save_file({"logits": torch.stack(done.logits, 1).float().contiguous(),
           "answer": done.sequences[:, inputs["input_ids"].shape[1]:].contiguous()}, out)
try:  # this process's own peak: VmHWM (ru_maxrss would carry the parent's across fork + exec), else ru_maxrss
    peak = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
status.update(seconds=time.perf_counter() - start, peak_rss=peak)
print(json.dumps(status))
"""
CHECK_QUESTION = "What is shown in this image?"
CHECK_NEW_TOKENS = 8
# The check loads the model whole while its weights take at most this share of the available memory; above it,
# each side of the check holds at most CHECK_BUDGET_SHARE of the available memory (at least CHECK_BUDGET_MIN)
# and reads the rest from the safetensors files one module at a time.
CHECK_WHOLE_SHARE = 0.25
CHECK_BUDGET_SHARE = 0.05
CHECK_BUDGET_MIN = 256 * 1024 ** 2


def check_image(size: int = 64):
    """A fixed synthetic image (seeded noise over a gradient): the export check needs no dataset."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    pixels = np.stack([ramp[None, :].repeat(size, 0), ramp[:, None].repeat(size, 1),
                       rng.uniform(0, 255, (size, size))], axis=-1)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def check_budget(weights_bytes: int, available_bytes: int) -> int | None:
    """The CPU memory (bytes) each side of the export check may keep weights in, or None to load it whole:
    whole while the weights take at most ``CHECK_WHOLE_SHARE`` of the available memory, otherwise
    ``CHECK_BUDGET_SHARE`` of it (at least ``CHECK_BUDGET_MIN``), the rest offloaded."""
    if weights_bytes <= CHECK_WHOLE_SHARE * available_bytes:
        return None
    return max(CHECK_BUDGET_MIN, int(CHECK_BUDGET_SHARE * available_bytes))


def verify_export(run_model: Path, export_dir: Path, remote_code: bool, budget: int | None | str = "auto",
                  details: dict | None = None) -> tuple[float, bool]:
    """``(max |logits difference|, same greedy answer)`` between the run's model and the export reloaded in a
    fresh process with plain transformers, on a fixed image and question rendered with the model's own prompt
    format: the greedy answer's ``CHECK_NEW_TOKENS`` token ids and the logits of every step (the first step is
    the prompt's whole forward pass).

    The two sides run one after the other, each in the precision the model was saved in. ``budget``: the CPU
    memory each side may keep weights in (bytes), None for the whole model, ``"auto"`` for ``check_budget``; with
    a budget the run's model loads offloaded (``models.load(max_memory=...)``) and the export loads with plain
    transformers' ``device_map="auto"``, ``max_memory`` and an offload folder, so checking a model bigger than
    memory holds a few modules at a time. ``details``, when given, receives what the check did (budget, where
    the reloaded weights were, its seconds and peak RSS).

    The fresh process builds its inputs with ``AutoProcessor`` and they must equal the ones made here; a
    family whose stock processor needs torchvision (``families.processors``) is fed the inputs made here
    instead. Raises ``ValueError`` (one line) when the export does not load or its processor disagrees."""
    import time

    import torch
    from safetensors.torch import load_file, save_file

    from compression.data.records import single_turn
    from compression.measure import memory
    from compression.measure.evaluate import _to_model
    from compression.models import families, load
    from compression.models.loader import saved_dtype
    from compression.models.shards import return_freed_memory

    dtype = saved_dtype(run_model)  # a bf16 run is checked in bf16
    if budget == "auto":
        budget = check_budget(memory.weight_bytes(export_dir), memory.available_bytes("cpu"))
    start = time.perf_counter()
    original = load(str(run_model), dtype=dtype, **({"max_memory": {"cpu": budget}} if budget else {}))
    family = families.family_for(original.model.config)
    image = check_image()
    text = original.prompt.render(single_turn(CHECK_QUESTION), add_generation_prompt=True)
    made = {k: v.contiguous() for k, v in original.processor(images=[image], text=[text], return_tensors="pt").items()}
    inputs = _to_model(made, original.model)
    with torch.no_grad():
        done = original.model.generate(**inputs, max_new_tokens=CHECK_NEW_TOKENS, do_sample=False, output_logits=True,
                                       return_dict_in_generate=True)
    reference = torch.stack(done.logits, 1).float().cpu()
    answer = done.sequences[:, inputs["input_ids"].shape[1]:].cpu()
    run_seconds = time.perf_counter() - start
    del original, inputs, done
    return_freed_memory()  # the run's model is gone before the export is loaded: the check holds one model at a time
    with tempfile.TemporaryDirectory() as tmp:
        image_path, given = Path(tmp) / "image.png", Path(tmp) / "inputs.safetensors"
        image.save(image_path)
        save_file(made, given)
        out = Path(tmp) / "logits.safetensors"
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONPATH="")
        done = subprocess.run([sys.executable, "-c", _RELOAD_SCRIPT, str(export_dir), str(image_path), text, str(out),
                               "1" if remote_code else "0", str(given), str(budget or ""), str(Path(tmp) / "offload"),
                               str(CHECK_NEW_TOKENS)], capture_output=True, text=True, env=env, cwd=tmp, timeout=3600)
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise ValueError(f"export check failed: the export does not load with plain transformers: {last}")
        status = json.loads(done.stdout.strip().splitlines()[-1])
        exported = load_file(out)
    if details is not None:
        details.update(budget_bytes=budget, dtype=dtype, run_seconds=run_seconds, reload_where=status["where"],
                       reload_seconds=status["seconds"], reload_peak_rss=status["peak_rss"],
                       new_tokens=int(answer.shape[1]))
    if status["processor"] != "loaded" and not families.processors.needs_image_only(family):
        raise ValueError(f"export check failed: AutoProcessor cannot load the export: {status['processor']}")
    if status.get("same_inputs") is False:
        raise ValueError("export check failed: the export's AutoProcessor makes different inputs from the run's processor")
    if reference.shape != exported["logits"].shape:
        raise ValueError(f"export check failed: logits shape {tuple(exported['logits'].shape)}; expected "
                         f"{tuple(reference.shape)}")
    difference = (reference - exported["logits"]).abs().max().item()
    if details is not None:
        details["max_logit_difference"] = difference
    return difference, torch.equal(answer, exported["answer"])


# ------------------------------------------------------------------------------------------- model card

def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if kind == "pct":
        return f"{value:.1%}"
    if kind == "int":
        return f"{value:,}"
    if kind == "mb":
        return f"{value / 1e6:.2f} MB"
    return f"{value:.1f}"


def model_card(metrics: dict[str, Any], name: str, remote_code: bool, shipped_template: bool = False) -> str:
    """README.md: what was done, the original-vs-compressed table, how to load it."""
    o, c = metrics.get("original", {}), metrics.get("compressed", {})
    recipe = metrics.get("recipe") or {}
    prune, recovery = recipe.get("prune", {}), recipe.get("recovery", {})
    rows = [("accuracy", "accuracy", "pct")]
    rows += [(f"accuracy: {t}", None, "pct") for t in o.get("per_type", {})]
    rows += [("parameters", "params_total", "int"), ("language-model parameters", "params_language", "int"),
             ("weights on disk", "size_bytes", "mb"), ("prefill (ms, measured)", "prefill_ms", "f"),
             ("decode (tokens/s, measured)", "decode_tokens_per_s", "f")]
    table = ["| | original | compressed |", "| --- | --- | --- |"]
    for label, key, kind in rows:
        if key is None:
            t = label.split(": ", 1)[1]
            a, b = o.get("per_type", {}).get(t), c.get("per_type", {}).get(t)
        else:
            a, b = o.get(key), c.get(key)
        table.append(f"| {label} | {_fmt(a, kind)} | {_fmt(b, kind)} |")
    what_if = metrics.get("what_if") or {}
    if what_if:
        table.append(f"| prefill (ms, what-if estimate) | {_fmt(what_if['original'].get('prefill_ms'), 'f')} | "
                     f"{_fmt(what_if['compressed'].get('prefill_ms'), 'f')} |")
    if remote_code:
        load_code = (f'from transformers import AutoModelForImageTextToText, AutoProcessor\n\n'
                     f'model = AutoModelForImageTextToText.from_pretrained("{name}", trust_remote_code=True)\n'
                     f'processor = AutoProcessor.from_pretrained("{name}")')
        why = ("Layers were pruned to different widths, so the folder ships its own modeling code "
               "(`modeling_llava_pruned.py` or `modeling_vlm_pruned.py`): load it with `trust_remote_code=True`.")
    else:
        load_code = (f'from transformers import AutoModelForImageTextToText, AutoProcessor\n\n'
                     f'model = AutoModelForImageTextToText.from_pretrained("{name}")\n'
                     f'processor = AutoProcessor.from_pretrained("{name}")')
        why = "Every layer has the same shape, so plain transformers loads it."
    steps = []
    if prune.get("method", "none") != "none":
        steps.append(f"{prune['method']}wise pruning of {prune['ratio']:.0%} of the language model "
                     f"(scorer: {prune.get('scorer')})")
    data = metrics.get("data") or {}
    if recovery.get("mode", "none") != "none":
        trained_on = (data.get("train") or {}).get("described", "the training data")
        steps.append(f"recovery: {recovery['mode']} finetuning on {trained_on}, distillation "
                     f"{recovery['distillation']}")
    if recipe.get("quantize", "none") != "none":
        steps.append(f"quantization: {recipe['quantize']}")
    evaluated = (data.get("eval") or {}).get("described", f"{metrics.get('eval_samples', '?')} held-out questions")
    metric = (metrics.get("original") or {}).get("metric", "exact match")
    prompt = metrics.get("prompt", "the model's prompt format")
    if shipped_template:
        prompt += " (shipped in this folder as chat_template.jinja)"
    return f"""---
library_name: transformers
pipeline_tag: image-text-to-text
tags: [llava, pruned, compression]
---
# {name}

Compressed from `{recipe.get('model', '?')}` with MLLM Compression Studio: {'; '.join(steps) or 'no compression'}.
Methods: structural pruning and small-data recovery after Huang et al., *Investigating Structural Pruning
and Recovery Techniques for Compressing MLLMs* (arXiv 2507.20749).

## Original vs compressed

Accuracy ({metric.replace('_', ' ')}) on {evaluated}, prompted with {prompt}; latency measured on the
machine that ran the job (batch 1, medians, both models interleaved in one process).

{chr(10).join(table)}

## Load it

{why}

```python
{load_code}
```

`recipe.yaml` reproduces this run (`python -m compression run recipe.yaml`); `metrics.json` holds every number above.
"""
