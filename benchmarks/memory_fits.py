"""What fits on one GPU of 24, 48 and 80 GB, from the memory plan (``compression.measure.memory_plan``).

    .venv/bin/python benchmarks/memory_fits.py       # seconds: config only, no weights, no GPU

Config-only estimates (no model runs) for the shipped LLaVA-1.5-7B and -13B configs in bf16, a sample of
576 visual tokens + 64 text tokens, recovery batch 4: evaluation / Q&A, and recovery of the projector, LoRA
(r 16) and the whole language model, each with and without hidden-state distillation from the bf16 teacher
(which holds the student's vision tower, not a copy: ``compression.methods.vision_sharing``) and gradient
checkpointing. A run fits when its predicted peak is under 90 % of the GPU. Results:
``benchmarks/results/memory_fits.md`` (and ``.csv``).
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPUS = (24, 48, 80)
CASES = [("evaluate / Q&A", None, "none", False)] + [
    (f"recover: {mode}{' + hidden KD' if kd != 'none' else ''}{', grad. checkpointing' if ckpt else ''}", mode, kd, ckpt)
    for mode in ("projector", "lora", "full") for kd in ("none", "hidden") for ckpt in (False, True)]


def main() -> int:
    from compression.measure.memory_plan import HEADROOM, plan_for_recipe
    from compression.models import load
    from compression.runs.recipe import Recipe

    rows = []
    for name in ("llava-1.5-7b", "llava-1.5-13b"):
        source = load(f"config:{name}")
        for label, mode, kd, ckpt in CASES:
            recovery = {"mode": mode or "none", "distillation": kd, "batch_size": 4, "gradient_checkpointing": ckpt}
            recipe = Recipe.from_dict({"model": "reference", "recovery": recovery})
            plan = plan_for_recipe(source, recipe, None, "bf16")
            stage = plan["stages"]["recover" if mode else "evaluate"]
            row = {"model": name, "stage": label, "predicted_gib": round(stage["total"] / 2**30, 1)}
            for gb in GPUS:
                row[f"{gb}GB"] = "fits" if stage["total"] <= HEADROOM * gb * 2**30 else "no"
            rows.append(row)
    out = ROOT / "benchmarks" / "results"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "memory_fits.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    lines = ["# What fits on one GPU (memory plan, estimated)", "",
             "Command: `.venv/bin/python benchmarks/memory_fits.py`. Config-only estimates from "
             "`compression/measure/memory_plan.py`: bf16, 640 tokens a sample (576 visual), recovery batch 4, "
             "AdamW with fp32 master weights, gradients and moments for what trains; a distilling teacher shares the "
             "student's vision tower; a run fits under 90 % of the GPU.",
             "", "| model | stage | predicted peak (GiB) | " + " | ".join(f"{g} GB" for g in GPUS) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in GPUS) + " |"]
    lines += [f"| {r['model']} | {r['stage']} | {r['predicted_gib']} | " + " | ".join(r[f"{g}GB"] for g in GPUS) + " |"
              for r in rows]
    (out / "memory_fits.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines[4:]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
