"""A local lmms-eval task from your data, so an exported run can be scored by lmms-eval exactly as the studio
scores it.

    python -m compression lmms-task --data mydata/test.json --samples 500 --out tasks/mydata
    lmms-eval --model llava_hf --model_args pretrained=<export>,device_map=auto --tasks mydata \\
              --include_path tasks/mydata --batch_size 1 --output_path lmms-out

The task folder holds ``data.jsonl`` (one row per record: absolute image paths, the question as the studio
prompts it — choices rendered for multiple choice — the answer, the choices), ``<name>.yaml`` (a
``dataset_path: json`` task with local ``data_files``, greedy generation of the studio's length) and
``utils.py``, whose ``process_results`` calls this repository's ``compression.data.scoring`` (the same
normalisation, letter extraction and yes/no reading), so both tools compute one metric. lmms-eval's
``llava_hf`` prompts through the processor's chat template; an export of a model without one ships the
studio's fallback as ``chat_template.jinja`` (``compression.runs.export``), so the prompts match too. One
difference remains: lmms-eval puts the image before the text, whatever the record says.

lmms-eval itself does not install beside this project's pinned CPU torch (it pulls torchvision, which
replaces torch with a CUDA build): install it in an environment of its own (README).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from compression.data import scoring
from compression.data.sources import Selection
from compression.paths import REPO_ROOT

_UTILS = '''"""lmms-eval hooks for a task written by `python -m compression lmms-task` (scored by the studio's own code)."""
import sys

sys.path.insert(0, {repo!r})  # compression.data.scoring needs only Pillow: no torch, no model code

from PIL import Image

from compression.data import scoring
from compression.data.records import record_from

METRIC = {metric!r}


def doc_to_visual(doc):
    return [Image.open(path).convert("RGB") for path in doc["image_paths"]]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["prompt"]


def process_results(doc, results):
    record = record_from(0, doc["question"], doc["answer"], choices=doc.get("choices") or None)
    return {{METRIC: float(scoring.is_correct(record, results[0], METRIC))}}
'''

_YAML = """# lmms-eval task written by `python -m compression lmms-task` from {described}
task: {name}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
generation_kwargs:
  max_new_tokens: {max_new_tokens}
  temperature: 0
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: {metric}
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""


def write_task(selection: Selection, out_dir: str | Path, name: str, metric: scoring.Metric = "auto",
               max_new_tokens: int = 16) -> Path:
    """Write the task folder for ``selection``'s records (those with images); returns the folder."""
    records = [r for r in selection.records if r.images]
    chosen = scoring.choose_metric(records, metric)
    out = Path(out_dir).expanduser().absolute()
    if out.exists() and any(out.iterdir()):
        raise ValueError(f"task folder {out} already exists and is not empty; expected a new folder")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    (tmp / "images").mkdir(parents=True)
    try:
        with open(tmp / "data.jsonl", "w") as f:
            for r in records:
                paths = []
                for k, image in enumerate(r.images):  # decoded records: write the pixels the studio saw
                    path = out / "images" / f"{r.index}-{k}.png"
                    image.save(tmp / "images" / path.name)
                    paths.append(str(path))
                messages = scoring.prompt_messages(r, chosen)
                prompt = " ".join(p["text"] for p in messages[-1]["content"] if p.get("type") == "text")
                f.write(json.dumps({"id": r.id, "index": r.index, "image_paths": paths, "question": r.question,
                                    "prompt": prompt, "answer": r.answer, "choices": r.choices, "type": r.type})
                        + "\n")
        (tmp / f"{name}.yaml").write_text(_YAML.format(name=name, data=out / "data.jsonl", metric=chosen,
                                                       max_new_tokens=max_new_tokens,
                                                       described=selection.describe()))
        (tmp / "utils.py").write_text(_UTILS.format(repo=str(REPO_ROOT), metric=chosen))
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
