"""Peak memory of a distillation recovery with the vision tower shared by teacher and student, and without.

    nice -n 19 .venv/bin/python benchmarks/bench_recovery_memory.py     # 4 processes; 2 min of CPU, 4 min of wall under nice
    nice -n 19 .venv/bin/python benchmarks/bench_recovery_memory.py --steps 3 --out /tmp/bench   # losses of 3 steps

The model is a random LLaVA with LLaVA-1.5's layout at small widths (``benchmarks/scale_model.py``'s config and
processor with ``shrink``): a CLIP ViT-B/16-shaped tower at 224 px (12 layers, hidden 768: 196 visual tokens), a
2-layer Llama decoder of hidden 1024 with the 32,064-token vocabulary, fp32 on the CPU, written once to a
temporary folder and read with ``compression.models.load``. The student is the teacher with one decoder layer
removed; recovery is full finetuning with hidden-state distillation (``sft+hidden``, ``hidden_layers: kept``),
batch 2, on ShapesVQA records, one step by default (the peak is reached in the first step, which allocates the
AdamW state; later steps repeat it). Each variant runs in its own process; the figure is that process's peak resident
set (``getrusage``), and the one before recovery started (teacher and student loaded). ``share_vision`` is the
difference (``compression.methods.vision_sharing``), with the teacher in two forms:

- ``in memory``: the teacher's weights in the process's own (anonymous) memory, as a GPU holds them;
- ``memory-mapped``: the teacher as ``models.load`` leaves it on the CPU, its tensors views of the memory-mapped
  safetensors file. Its freed tower then leaves the file's pages resident (clean pages the kernel may reclaim,
  but RSS counts them), so the RSS figure cannot show the saving.

Wall times are printed for completeness only: the benchmark is meant to run under ``nice`` beside other work, so
they say nothing about speed.

Writes ``recovery_memory.md`` and ``recovery_memory.json`` into ``--out`` (default benchmarks/results).
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

SHRINK = {"text_config": {"hidden_size": 1024, "intermediate_size": 2816, "num_attention_heads": 16,
                          "num_key_value_heads": 16},
          "vision_config": {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                            "num_hidden_layers": 12, "image_size": 224, "patch_size": 16}}
LAYERS = 2


def write_model(folder: Path) -> Path:
    """The random model and its processor, saved as a Hugging Face folder."""
    import torch
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    import scale_model

    raw = scale_model.config_dict(LAYERS, shrink=SHRINK)
    torch.manual_seed(0)
    model = LlavaForConditionalGeneration(LlavaConfig(**raw)).eval()
    model.save_pretrained(folder)
    scale_model.build_processor(raw).save_pretrained(folder)
    return folder


def one_run(folder: str, share: bool, teacher_in_memory: bool, steps: int) -> dict:
    """In this process: load, prune one layer, distil ``steps`` steps; peak RSS before and after."""
    import torch

    from compression.data.sources import open_source, select
    from compression.measure.peaks import peak_rss_bytes
    from compression.methods import prune, recover, vision_sharing
    from compression.models import load, parameter_counts

    torch.manual_seed(0)
    loaded = load(folder)
    teacher = loaded.model.requires_grad_(False)
    plan = prune.make_plan(loaded, "layer", ratio=0.15)
    student, anatomy = prune.apply_plan(copy.deepcopy(teacher), loaded.anatomy, plan)
    if teacher_in_memory:  # copied out of the file's mapping, which goes with the last view of it
        teacher = loaded.model = copy.deepcopy(teacher)
    records = select(open_source({"path": "shapes", "split": "train"}), samples=2 * steps).records
    config = recover.RecoveryConfig(mode="full", distillation="hidden", batch_size=2, max_steps=steps,
                                    learning_rate=1e-4, share_vision=share,
                                    hidden_layers=recover.layer_mapping(loaded.anatomy.num_layers, plan.layers_removed,
                                                                        "kept"))
    before = peak_rss_bytes()
    lines: list[str] = []
    started = time.time()
    result = recover.recover(student, anatomy, loaded.prompt, records, config, teacher=teacher, log=lines.append)
    counts = parameter_counts(teacher, loaded.anatomy)
    return {"share_vision": share, "teacher": "in memory" if teacher_in_memory else "memory-mapped",
            "peak_rss_before_bytes": before, "peak_rss_bytes": peak_rss_bytes(),
            "seconds_under_nice": round(time.time() - started, 1), "losses": result.losses,
            "unique_parameter_bytes": vision_sharing.unique_parameter_bytes(teacher, result.model),
            "vision_bytes": counts["vision"] * 4, "params_total": counts["total"],
            "log": [line for line in lines if "vision tower" in line]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--child", nargs=3, metavar=("FOLDER", "SHARE", "IN_MEMORY"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(one_run(args.child[0], args.child[1] == "1", args.child[2] == "1", args.steps)))
        return 0
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_model(Path(tmp) / "model")
        runs = []
        for in_memory, share in ((True, False), (True, True), (False, False), (False, True)):
            done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--child", str(folder),
                                   str(int(share)), str(int(in_memory))], capture_output=True, text=True, env=env,
                                  check=False)
            if done.returncode:
                print(done.stderr[-3000:], file=sys.stderr)
                return 1
            runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    alone, shared = runs[:2]
    gib = 2**30
    summary = {
        "command": "nice -n 19 .venv/bin/python benchmarks/bench_recovery_memory.py"
                   + (f" --steps {args.steps}" if args.steps != 1 else ""),
        "model": f"random LLaVA, ViT-B/16-shaped CLIP at 224 px + {LAYERS}-layer Llama (hidden 1024), fp32, "
                 f"{alone['params_total'] / 1e6:.0f} M parameters of which {alone['vision_bytes'] / 4e6:.0f} M vision",
        "recovery": f"full + hidden KD, student with 1 of {LAYERS} layers removed, batch 2, {args.steps} step(s)",
        "runs": runs,
        "saved_peak_bytes": alone["peak_rss_bytes"] - shared["peak_rss_bytes"],
        "saved_peak_bytes_memory_mapped_teacher": runs[2]["peak_rss_bytes"] - runs[3]["peak_rss_bytes"],
        "saved_parameter_bytes": alone["unique_parameter_bytes"] - shared["unique_parameter_bytes"],
        "same_losses": all(abs(a - b) <= 1e-6 * max(1.0, abs(a)) for x, y in (runs[:2], runs[2:])
                           for a, b in zip(x["losses"], y["losses"])),
    }
    rows = [f"| {r['teacher']} | {'shared' if r['share_vision'] else 'two towers'} | "
            f"{r['peak_rss_before_bytes'] / gib:.2f} | "
            f"{r['peak_rss_bytes'] / gib:.2f} | {r['unique_parameter_bytes'] / gib:.3f} | "
            f"{', '.join(f'{x:.4f}' for x in r['losses'])} | {r['seconds_under_nice']} |" for r in runs]
    lines = ["# Recovery memory: one vision tower for teacher and student", "",
             f"Command: `{summary['command']}` (measured; each variant in its own process).", "",
             f"Model: {summary['model']}. Recovery: {summary['recovery']}, on the CPU.", "",
             "| teacher | vision tower | peak RSS before recovery (GiB) | peak RSS (GiB) | teacher + student "
             "parameters (GiB) | losses | seconds (under nice: not a speed figure) |",
             "| --- | --- | --- | --- | --- | --- | --- |", *rows, "",
             f"With the teacher in memory, sharing lowered the peak by {summary['saved_peak_bytes'] / 2**20:.0f} MiB; "
             f"the tower's fp32 weights are {alone['vision_bytes'] / 2**20:.0f} MiB (parameters held: "
             f"{summary['saved_parameter_bytes'] / 2**20:.0f} MiB fewer). With the memory-mapped teacher: "
             f"{summary['saved_peak_bytes_memory_mapped_teacher'] / 2**20:.0f} MiB (its freed pages stay resident). "
             f"Losses equal to 1e-6 in both pairs: {summary['same_losses']}."]
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "recovery_memory.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / "recovery_memory.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
