"""Recovery after structural pruning, measured on the reference model (CPU).

    python benchmarks/bench_recovery.py            # full grid, about 20-25 min on 2 cores
    python benchmarks/bench_recovery.py --quick    # 30 % only, three recoveries, 1 and 5 % data: ~4 min
    python benchmarks/bench_recovery.py --quick --eval-samples 20 --max-steps 2 --out /tmp/bench   # smoke run
    python benchmarks/bench_recovery.py --model MODEL --data my_eval.json --train-data my_train.json   # your own

Grid (Huang et al., arXiv 2507.20749, section "recovery"): {width, layer} pruning x {15, 30, 50 %}
of the language model x {no recovery, projector-only, LoRA (+projector), full SFT, SFT + hidden-state
KD, SFT + logits KD}, each trained for one epoch on 5 % of the training data (default: the ShapesVQA
train split, 2,000 questions); then the data fraction 1 / 5 / 25 / 100 % for the best recipe at 30 %.
Reported: accuracy kept (compressed / original accuracy on held-out records: ``--data``, default
``shapes``, its test split) and recovery wall time. The same library calls as a job
(compression.data.sources, compression.methods.prune, compression.methods.recover,
compression.measure.evaluate). When training and evaluation read the same file, the evaluation
records are left out of training.

Writes recovery.csv, recovery_fractions.csv, recovery.png, recovery_fractions.png and recovery.md into
``--out`` (default benchmarks/results), and prints the summary.
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.data.records import DataError  # noqa: E402
from compression.data.sources import Selection, open_source, select
from compression.measure import evaluate
from compression.methods import importance
from compression.methods import prune
from compression.methods import recover
from compression.models import load  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name -> (mode, distillation, learning rate). Rates: the projector and LoRA adapters are small and
# start from scratch / zero, so they take larger steps than full finetuning (shared notes: ~1e-4
# is safe for full SFT of these small models; 5e-4 hurt lightly pruned ones).
RECOVERIES = {
    "none": ("none", "none", 0.0),
    "projector": ("projector", "none", 1e-3),
    "lora": ("lora", "none", 1e-3),
    "full SFT": ("full", "none", 2e-4),
    "SFT + hidden KD": ("full", "hidden", 2e-4),
    "SFT + logits KD": ("full", "logits", 2e-4),
}


def ratio_of(a: float, b: float) -> float:
    return a / b if b else float("nan")


def pruned_copy(original, method: str, ratio: float, calibration: Selection):
    if method == "layer":
        scores = importance.cached_importance(original, "layers", "block_influence", calibration)
    else:
        scores = {k: importance.cached_importance(original, k, "taylor", calibration) for k in ("heads", "neurons")}
    model = copy.deepcopy(original.model)
    try:
        plan = prune.make_plan((model, original.anatomy), method, ratio=ratio, scores=scores)
    except ValueError:
        # The paper's width range (first 3 and last layer whole) caps the reference model at ~44 %;
        # past that, every layer is eligible (as bench_pruning's "width-all" rows).
        if method != "width":
            raise
        plan = prune.make_plan((model, original.anatomy), method, ratio=ratio, scores=scores,
                               layer_range=(0, original.anatomy.num_layers))
    model, anatomy = prune.apply_plan(model, original.anatomy, plan)
    return model, anatomy, plan


def run_recovery(original, student, anatomy, plan, name: str, samples, seed: int = 0, max_steps: int | None = None):
    mode, distillation, lr = RECOVERIES[name]
    config = recover.RecoveryConfig(
        mode=mode, distillation=distillation, learning_rate=lr, batch_size=16, epochs=1, seed=seed,
        hidden_layers=recover.layer_mapping(original.anatomy.num_layers, plan.layers_removed),
        alpha=0.5, temperature=2.0, lora_r=16, lora_alpha=32, max_steps=max_steps)
    start = time.perf_counter()
    result = recover.recover(copy.deepcopy(student), anatomy, original.prompt, samples, config,
                             teacher=original.model)
    return result.model, time.perf_counter() - start, result.steps


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 %% only, 3 recoveries, 1 and 5 %% data")
    parser.add_argument("--model", default="reference")
    parser.add_argument("--data", default="shapes",
                        help="held-out records for accuracy: 'shapes' (the reference model's ShapesVQA), a "
                             "LLaVA-format .json/.jsonl file or a Hugging Face dataset folder / parquet file")
    parser.add_argument("--train-data", default=None,
                        help="records for recovery and calibration (default: --data; for shapes its train split)")
    parser.add_argument("--eval-samples", type=int, default=None, help="held-out questions (default 400, quick 200)")
    parser.add_argument("--calibration", type=int, default=10, help="samples for the importance scores (paper: 10)")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--max-steps", type=int, default=None, help="cap per recovery (smoke tests only)")
    parser.add_argument("--out", "--results", dest="results", type=Path, default=RESULTS,
                        help="where CSV / PNG / MD go")
    parser.add_argument("--ratios", type=float, nargs="+", help="override the pruning ratios")
    parser.add_argument("--recoveries", nargs="+", help=f"override the recoveries (of {list(RECOVERIES)})")
    parser.add_argument("--fractions", type=float, nargs="+", help="override the data fractions of the sweep")
    parser.add_argument("--tag", default="", help="suffix of the output file names")
    parser.add_argument("--from-csv", action="store_true",
                        help="no training: redraw the charts and the summary from the CSVs already written "
                             "(e.g. of a run cut short)")
    args = parser.parse_args(argv)
    if args.from_csv:
        return redraw(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = args.results
    results.mkdir(parents=True, exist_ok=True)

    ratios = args.ratios or ([0.3] if args.quick else [0.15, 0.3, 0.5])
    names = args.recoveries or (["none", "projector", "lora", "SFT + hidden KD"] if args.quick else list(RECOVERIES))
    fractions = args.fractions or ([0.01, 0.05] if args.quick else [0.01, 0.05, 0.25, 1.0])
    unknown = [n for n in names if n not in RECOVERIES]
    if unknown:
        parser.error(f"unknown recoveries {unknown}; expected some of {list(RECOVERIES)}")
    n_eval = args.eval_samples or (200 if args.quick else 400)
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    args.train_data = args.train_data or args.data

    try:
        test = select(open_source(args.data, "eval"), samples=n_eval, need_images=True)
        train_source = open_source(args.train_data, "train")
        # one file for both: recovery never trains on a record that evaluation scores
        held_out = test.indices if train_source.fingerprint() == test.source.fingerprint() else ()

        def train_subset(fraction: float) -> Selection:
            return select(train_source, fraction=fraction, seed=0, order="random", exclude=held_out)

        train5 = train_subset(0.05)
        calibration = importance.calibration_selection(args.train_data, args.calibration)
    except DataError as e:
        parser.error(str(e))
    records = test.records
    original = load(args.model)
    original.model.requires_grad_(False)
    base = evaluate.accuracy(original, records)
    print(f"original: {base.accuracy:.1%} on {test.describe()} ({args.model})", flush=True)
    # decoded once, before any timing: recovery_s measures training, not image decoding
    train5_records = train5.records
    trained_on = f"5 % of {train_source.label} ({len(train5):,} records)"

    rows = []
    students = {(m, r): pruned_copy(original, m, r, calibration) for m in ("width", "layer") for r in ratios}
    # Recoveries in the outer loop: a run cut short still compares both paradigms on what it did.
    for name in names:
        for (method, ratio), (student, anatomy, plan) in students.items():
            if name == "none":
                model, seconds, steps = student, 0.0, 0
            else:
                model, seconds, steps = run_recovery(original, student, anatomy, plan, name, train5_records,
                                                       max_steps=args.max_steps)
            acc = evaluate.accuracy(original, records, model=model)
            rows.append({"method": method, "ratio_requested": ratio, "ratio_achieved": plan.ratio_achieved,
                         "recovery": name, "data_fraction": 0.05 if steps else 0.0, "steps": steps,
                         "recovery_s": round(seconds, 1), "accuracy": acc.accuracy,
                         "accuracy_original": base.accuracy, "kept": ratio_of(acc.accuracy, base.accuracy),
                         **{f"acc_{k}": v for k, v in acc.per_type.items()}})
            print(f"{method:>5} {ratio:.0%} (achieved {plan.ratio_achieved:.1%}) {name:<16} "
                  f"acc {acc.accuracy:.1%} kept {ratio_of(acc.accuracy, base.accuracy):.1%} in {seconds:.0f}s", flush=True)
            pd.DataFrame(rows).to_csv(results / f"recovery{suffix}.csv", index=False)
    grid = pd.DataFrame(rows)

    # Data fraction for the best recipe at 30 %.
    at30 = grid[(grid.ratio_requested == 0.3) & (grid.recovery != "none")]
    best = at30.sort_values(["kept", "recovery_s"], ascending=[False, True]).iloc[0]
    student, anatomy, plan = pruned_copy(original, best.method, 0.3, calibration)
    frac_rows = []
    for fraction in fractions:
        samples = train5_records if fraction == 0.05 else train_subset(fraction).records
        model, seconds, steps = run_recovery(original, student, anatomy, plan, best.recovery, samples,
                                              max_steps=args.max_steps)
        acc = evaluate.accuracy(original, records, model=model)
        frac_rows.append({"method": best.method, "ratio_requested": 0.3, "recovery": best.recovery,
                          "data_fraction": fraction, "train_samples": len(samples), "steps": steps,
                          "recovery_s": round(seconds, 1), "accuracy": acc.accuracy,
                          "kept": ratio_of(acc.accuracy, base.accuracy)})
        print(f"data {fraction:>5.0%} ({len(samples)} questions, {steps} steps): acc {acc.accuracy:.1%} "
              f"kept {ratio_of(acc.accuracy, base.accuracy):.1%} in {seconds:.0f}s", flush=True)
        pd.DataFrame(frac_rows).to_csv(results / f"recovery_fractions{suffix}.csv", index=False)
    fracs = pd.DataFrame(frac_rows)

    charts(grid, fracs, suffix, results)
    summary = summarize(grid, fracs, base.accuracy, f"{base.metric} on {test.describe()}", trained_on, args, suffix)
    (results / f"recovery{suffix}.md.tmp").write_text(summary)
    os.replace(results / f"recovery{suffix}.md.tmp", results / f"recovery{suffix}.md")
    print(summary)


def redraw(args) -> None:
    suffix = ("_quick" if args.quick else "") + (f"_{args.tag}" if args.tag else "")
    grid = pd.read_csv(args.results / f"recovery{suffix}.csv")
    path = args.results / f"recovery_fractions{suffix}.csv"
    fracs = pd.read_csv(path) if path.is_file() else pd.DataFrame()
    args.threads = args.threads if args.threads else 1
    args.train_data = args.train_data or args.data
    charts(grid, fracs, suffix, args.results)
    evaluated = f"measured on {args.eval_samples or '?'} records of {open_source(args.data, 'eval').label}"
    trained_on = f"5 % of {open_source(args.train_data, 'train').label}"
    summary = summarize(grid, fracs, float(grid.accuracy_original.iloc[0]), evaluated, trained_on, args, suffix)
    (args.results / f"recovery{suffix}.md").write_text(summary)
    print(summary)


def charts(grid: pd.DataFrame, fracs: pd.DataFrame, suffix: str, results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = ["width", "layer"]
    ratios = sorted(grid.ratio_requested.unique())
    names = list(dict.fromkeys(grid.recovery))
    fig, axes = plt.subplots(1, len(methods), figsize=(6 * len(methods), 4), sharey=True)
    for ax, method in zip(np.atleast_1d(axes), methods):
        width = 0.8 / len(names)
        for i, name in enumerate(names):
            part = grid[(grid.method == method) & (grid.recovery == name)].set_index("ratio_requested")
            ax.bar([x + i * width - 0.4 + width / 2 for x in range(len(ratios))],
                   [100 * part.kept.get(r, float("nan")) for r in ratios], width, label=name)
        ax.axhline(97, color="k", ls="--", lw=0.8)
        ax.set_xticks(range(len(ratios)), [f"{r:.0%}" for r in ratios])
        ax.set_title(f"{method}wise pruning")
        ax.set_xlabel("language-model parameters removed (requested)")
    axes[0].set_ylabel("accuracy kept vs original (%)")
    axes[-1].legend(fontsize=8, loc="lower left")
    fig.suptitle("Recovery on 5 % of the data (reference model, CPU); dashed: 97 %")
    fig.tight_layout()
    fig.savefig(results / f"recovery{suffix}.png", dpi=120)
    plt.close(fig)

    if fracs.empty:
        return
    fig, ax1 = plt.subplots(figsize=(6, 4))
    ax1.plot(100 * fracs.data_fraction, 100 * fracs.kept, "o-", label="accuracy kept")
    ax1.set_xscale("log")
    ax1.set_xlabel("training data used (% of the train split)")
    ax1.set_ylabel("accuracy kept (%)")
    ax2 = ax1.twinx()
    ax2.plot(100 * fracs.data_fraction, fracs.recovery_s, "s--", color="tab:red", label="recovery time")
    ax2.set_ylabel("recovery wall time (s)", color="tab:red")
    first = fracs.iloc[0]
    ax1.set_title(f"{first.method} 30 % + {first.recovery}: data fraction")
    fig.tight_layout()
    fig.savefig(results / f"recovery_fractions{suffix}.png", dpi=120)
    plt.close(fig)


def markdown(frame: pd.DataFrame, index: bool = True, digits: int = 1) -> str:
    """A pipe table (pandas' to_markdown needs the tabulate package, not a dependency here)."""
    frame = frame.reset_index() if index else frame
    def cell(v):
        return f"{v:.{digits}f}" if isinstance(v, float) else str(v)
    head = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, rule, *body])


def _kept(grid, method, ratio, name):
    part = grid[(grid.method == method) & (grid.ratio_requested == ratio) & (grid.recovery == name)]
    return float(part.kept.iloc[0]) if len(part) else None


def _head_to_head(grid, ratios, first: str, second: str) -> tuple[int, int]:
    """Settings (method x ratio) where ``first`` keeps at least as much as ``second``, of those both ran."""
    pairs = [(_kept(grid, m, r, first), _kept(grid, m, r, second)) for m in ("width", "layer") for r in sorted(ratios)]
    pairs = [(a, b) for a, b in pairs if a is not None and b is not None]
    return sum(a >= b for a, b in pairs), len(pairs)


def summarize(grid: pd.DataFrame, fracs: pd.DataFrame, base: float, evaluated: str, trained_on: str, args,
              suffix: str) -> str:
    grid = grid.assign(budget=[f"{r:.0%} (achieved {a:.1%})" for r, a in zip(grid.ratio_requested, grid.ratio_achieved)])
    # dropna=False keeps a recovery column even where every run of it failed; the rows of
    # (method, budget) pairs that never ran (budgets differ per method) are dropped.
    table = 100 * grid.pivot_table(index=["method", "budget"], columns="recovery", values="kept", sort=False,
                                   dropna=False).dropna(how="all")
    times = grid[grid.recovery != "none"].pivot_table(index=["method", "budget"], columns="recovery",
                                                      values="recovery_s", sort=False)
    lines = [f"# Recovery after pruning (reference model, CPU, {args.threads} threads)", "",
             f"Command: `{' '.join(['python benchmarks/bench_recovery.py', *sys.argv[1:]])}`. Original accuracy {base:.1%}, "
             f"{evaluated} (held out). Recovery: one epoch on {trained_on}, "
             "global batch 16. Cells: accuracy kept vs the original (%).", "",
             markdown(table), "", "Recovery wall time (s):", "", markdown(times, digits=0), "",
             "Data fraction for the best recipe at 30 %:", "",
             markdown(fracs[["method", "recovery", "data_fraction", "train_samples", "steps", "recovery_s", "accuracy",
                             "kept"]], index=False, digits=3) if not fracs.empty else "(not run)", "",
             "## The paper's findings, checked here", ""]
    checks = []
    ratios = set(grid.ratio_requested)
    paper_no_recovery = {0.15: "90.9 vs 72.2", 0.3: "79.9 vs 69.2"}  # LLaVA-1.5-7B, width vs layer
    for ratio in sorted(ratios & set(paper_no_recovery)):
        w, l_ = _kept(grid, "width", ratio, "none"), _kept(grid, "layer", ratio, "none")
        if w is not None and l_ is not None:
            checks.append((w > l_, f"without recovery widthwise keeps more than layerwise at {ratio:.0%} "
                                   f"(width {w:.1%} vs layer {l_:.1%}; paper LLaVA-7B {paper_no_recovery[ratio]})"))
    for ratio in sorted(ratios & {0.15, 0.3}) if "SFT + hidden KD" in set(grid.recovery) else []:
        k = max(_kept(grid, m, ratio, "SFT + hidden KD") or 0 for m in ("width", "layer"))
        checks.append((k >= 0.97 if ratio == 0.3 else k >= 0.95,
                       f"SFT + hidden KD keeps >= {'97' if ratio == 0.3 else '95'} % at {ratio:.0%} "
                       f"(best of width/layer: {k:.1%}; paper 96-98 %)"))
    if 0.15 in ratios and "projector" in set(grid.recovery):
        for m in ("width", "layer"):
            p, best = _kept(grid, m, 0.15, "projector"), max(grid[(grid.method == m) & (grid.ratio_requested == 0.15)].kept)
            checks.append((p >= best - 0.02, f"projector-only finetuning suffices at 15 % {m}wise "
                                             f"({p:.1%} vs best {best:.1%}, within 2 points)"))
    if "SFT + hidden KD" in set(grid.recovery) and "full SFT" in set(grid.recovery):
        wins, total = _head_to_head(grid, ratios, "SFT + hidden KD", "full SFT")
        checks.append((total and wins > total / 2, f"hidden-state KD helps over plain SFT ({wins}/{total} settings "
                                              "equal or better)"))
    if "SFT + logits KD" in set(grid.recovery) and "SFT + hidden KD" in set(grid.recovery):
        wins, total = _head_to_head(grid, ratios, "SFT + hidden KD", "SFT + logits KD")
        checks.append((total and wins > total / 2, f"hidden-state KD beats logits KD (paper: L2 on hidden states is the "
                                              f"best) ({wins}/{total} settings)"))
    if 0.5 in ratios:
        rec = [n for n in grid.recovery.unique() if n != "none"]
        w = max(_kept(grid, "width", 0.5, n) or 0 for n in rec)
        l_ = max(_kept(grid, "layer", 0.5, n) or 0 for n in rec)
        checks.append((w > l_, f"at 50 % widthwise + recovery beats layerwise + recovery (width {w:.1%} vs layer "
                               f"{l_:.1%}; paper: widthwise for >= 45 %)"))
    if len(fracs) > 1:
        f5 = float(fracs[fracs.data_fraction == 0.05].kept.iloc[0])
        fmax = float(fracs.kept.max())
        checks.append((fmax - f5 <= 0.02, f"5 % of the data is nearly enough (5 %: {f5:.1%}, best fraction "
                                          f"{fmax:.1%}; within 2 points)"))
    slowest30 = grid[(grid.ratio_requested == 0.3) & (grid.recovery == "SFT + hidden KD")].recovery_s.max()
    if slowest30 == slowest30:  # not NaN
        checks.append((slowest30 <= 180, f"SFT + hidden KD at 30 % recovers in <= 3 min on this CPU ({slowest30:.0f}s)"))
    for ok, text in checks:
        lines.append(f"- {'reproduces' if ok else 'does NOT reproduce'}: {text}")
    where = args.results.resolve()
    where = where.relative_to(ROOT) if where.is_relative_to(ROOT) else where
    lines += ["", f"Raw numbers: `{where}/recovery{suffix}.csv`, "
              f"`{where}/recovery_fractions{suffix}.csv`; charts: `recovery{suffix}.png`, "
              f"`recovery_fractions{suffix}.png`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
