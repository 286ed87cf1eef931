"""bitsandbytes int8 / nf4 of the language model vs fp32, plus simulated WxAy, on the reference model (measured).

    .venv/bin/python benchmarks/bench_quantize.py                    # reference model, 500 ShapesVQA test questions
    .venv/bin/python benchmarks/bench_quantize.py --samples 20 --repeats 1 --out /tmp/bench   # smoke run
    .venv/bin/python benchmarks/bench_quantize.py --model MODEL --data my_eval.json   # your model on your own data

Real quantization (``compression.methods.quantize.quantize_model``): decoder linear layers only; vision tower,
projector, embeddings and lm_head stay fp32. Sizes: bytes of the tensors in memory and of the saved
safetensors folder. Latency: ``evaluate.latency`` with the three models interleaved (batch 1, medians).
Simulated rows (``fake_quantize``) give accuracy only: their weights are still fp32 in memory.
Accuracy on ``--data`` (default ``shapes``: the reference model's ShapesVQA test split); latency on its first record.

Writes quantize.csv, quantize.png and quantize.md into ``--out`` (default benchmarks/results); prints the summary.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from compression.data.records import DataError  # noqa: E402
from compression.data.sources import open_source, select
from compression.measure import evaluate
from compression import models
from compression.methods import quantize

RESULTS = Path(__file__).resolve().parent / "results"


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def language_bytes(model: torch.nn.Module, anatomy: models.Anatomy) -> int:
    # tensor bytes of the decoder layers: what quantization changes (packed 4-bit weights count as stored)
    layers = anatomy.decoder_layers(model)
    return sum(p.numel() * p.element_size() for p in layers.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="reference")
    parser.add_argument("--data", default="shapes",
                        help="records for accuracy: 'shapes' (the reference model's ShapesVQA), a LLaVA-format "
                             ".json/.jsonl file or a Hugging Face dataset folder / parquet file")
    parser.add_argument("--samples", type=int, default=500)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the project machine has 2 cores)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where CSV / PNG / MD go")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    try:
        test = select(open_source(args.data, "eval"), samples=args.samples, need_images=True)
    except DataError as e:
        parser.error(str(e))
    records = test.records

    loaded = {fmt: models.load(args.model) for fmt in ("fp32", "int8", "nf4")}
    anatomy = loaded["fp32"].anatomy
    processor = loaded["fp32"].processor
    inputs = evaluate.latency_inputs(loaded["fp32"], records[0])
    fallback = {"total": len(quantize.decoder_linears(loaded["fp32"].model, anatomy))}
    for fmt in ("int8", "nf4"):
        quantize.quantize_model(loaded[fmt].model, anatomy, fmt)
        fallback[fmt] = quantize.prepare_bnb_for_cpu(loaded[fmt].model)

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for fmt, item in loaded.items():
            folder = Path(tmp) / fmt
            if fmt == "fp32":
                item.model.save_pretrained(folder)
            else:
                quantize.save_quantized(item.model, processor, folder, fmt)
            start = time.perf_counter()
            result = evaluate.accuracy(item, records, batch_size=args.batch_size)
            rows.append({"model": fmt, "kind": "bitsandbytes" if fmt != "fp32" else "reference",
                         "accuracy": result.accuracy, "n": result.n,
                         "tensor_bytes": models.tensor_bytes(item.model),
                         "decoder_bytes": language_bytes(item.model, anatomy),
                         "folder_bytes": folder_bytes(folder), "eval_seconds": time.perf_counter() - start})
            print(f"  {fmt}: accuracy {result.accuracy:.1%}, folder {rows[-1]['folder_bytes'] / 1e6:.2f} MB", flush=True)

    latency = evaluate.latency({fmt: item.model for fmt, item in loaded.items()}, inputs, repeats=args.repeats,
                               warmup=3, decode_tokens=8)
    for row in rows:
        row.update(prefill_ms=latency[row["model"]]["prefill_ms"],
                   decode_tokens_per_s=latency[row["model"]]["decode_tokens_per_s"])

    fp = loaded["fp32"]
    for w_bits, a_bits in ((8, 8), (4, 16), (4, 4)):
        with quantize.fake_quantize(fp.model, anatomy, w_bits, a_bits) as handle:
            result = evaluate.accuracy(fp, records, batch_size=args.batch_size)
        rows.append({"model": handle.label, "kind": "simulated", "accuracy": result.accuracy, "n": result.n,
                     "tensor_bytes": "", "decoder_bytes": "", "folder_bytes": "", "eval_seconds": "",
                     "prefill_ms": "", "decode_tokens_per_s": ""})
        print(f"  {handle.label} (simulated): accuracy {result.accuracy:.1%}", flush=True)

    tmp_csv = out / "quantize.csv.tmp"
    with open(tmp_csv, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp_csv, out / "quantize.csv")
    chart(rows, out)
    summary = summarize(args, rows, fallback, test, result.metric)
    (out / "quantize.md.tmp").write_text(summary)
    os.replace(out / "quantize.md.tmp", out / "quantize.md")
    print(summary)


def chart(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    real = [r for r in rows if r["kind"] != "simulated"]
    names = [r["model"] for r in real]
    panels = [("accuracy (%)", [100 * r["accuracy"] for r in real]),
              ("decoder weights (MB)", [r["decoder_bytes"] / 1e6 for r in real]),
              ("saved folder (MB)", [r["folder_bytes"] / 1e6 for r in real]),
              ("prefill (ms, median)", [r["prefill_ms"] for r in real]),
              ("decode (tokens/s, median)", [r["decode_tokens_per_s"] for r in real])]
    fig, axes = plt.subplots(1, len(panels), figsize=(16, 3.6))
    for ax, (title, values) in zip(axes, panels):
        bars = ax.bar(names, values, color=["tab:grey", "tab:blue", "tab:orange"][:len(names)])
        ax.bar_label(bars, fmt="%.3g", fontsize=8)
        ax.set_title(title, fontsize=10)
    fig.suptitle("bitsandbytes on CPU vs fp32 (measured)")
    fig.tight_layout()
    fig.savefig(out / "quantize.png", dpi=120)
    plt.close(fig)


def summarize(args, rows: list[dict], fallback: dict, test, metric: str) -> str:
    fp = rows[0]
    lines = [f"# Quantization of `{args.model}` (measured)", "",
             f"Command: `.venv/bin/python benchmarks/bench_quantize.py --model {args.model}"
             + (f" --data {args.data}" if args.data != "shapes" else "") + f" --samples {args.samples}`  ",
             f"Accuracy ({metric}) on {test.describe()}. bitsandbytes quantizes the decoder linear layers; "
             f"latency interleaved over the three models, batch 1, {args.repeats} repeats, torch threads "
             f"{torch.get_num_threads()}.", "",
             "| model | accuracy % | decoder MB | tensors MB | folder MB | prefill ms | decode tok/s |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if r["kind"] == "simulated":
            lines.append(f"| {r['model']} (simulated) | {100 * r['accuracy']:.1f} | | | | | |")
        else:
            lines.append(f"| {r['model']} | {100 * r['accuracy']:.1f} | {r['decoder_bytes'] / 1e6:.2f} | "
                         f"{r['tensor_bytes'] / 1e6:.2f} | {r['folder_bytes'] / 1e6:.2f} | {r['prefill_ms']:.2f} | "
                         f"{r['decode_tokens_per_s']:.0f} |")
    by = {r["model"]: r for r in rows}
    lines += ["", f"Decoder weights: int8 {fp['decoder_bytes'] / by['int8']['decoder_bytes']:.2f}x smaller, "
              f"nf4 {fp['decoder_bytes'] / by['nf4']['decoder_bytes']:.2f}x smaller than fp32. "
              f"Prefill vs fp32: int8 {by['int8']['prefill_ms'] / fp['prefill_ms']:.2f}x, "
              f"nf4 {by['nf4']['prefill_ms'] / fp['prefill_ms']:.2f}x the time.",
              f"NF4 layers outside the AVX512-BF16 kernel's shapes (generic CPU path): {len(fallback['nf4'])} of "
              f"{fallback['total']} decoder linear layers.",
              "Saved folders carry `quantization_config` (bitsandbytes) in config.json and a `quantization.json` note; "
              "they load with `models.load` / `from_pretrained` on CPU or CUDA.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
