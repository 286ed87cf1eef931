"""Reading a user's LLaVA-format data lazily: index a large conversation file, select a fraction, decode
only what was selected. The figures answer "can the studio read a 665k-record mix?" on this machine.

    .venv/bin/python benchmarks/bench_data.py                    # 100k records, ~2 min
    .venv/bin/python benchmarks/bench_data.py --records 20000 --out /tmp/bench-data   # a quick look

It writes ``llava_v1_5_mix665k``-shaped records (multi-turn, 10 % text-only, ``<image>`` at the start or
the end of the first human turn) pointing at a pool of PNG images, then measures, each step in a fresh
process so its peak RSS is its own (``compression.measure.peaks.peak_rss_bytes``: ``VmHWM``; ``ru_maxrss`` would
carry the parent's across fork + exec):

- ``index``: ``open_source`` on the file (the byte-offset scan over a memory map, cached afterwards);
- ``select 5 %``: a seeded random 5 % (records checked: text parsed, image headers read), then decoding
  a batch of 16 of them as recovery does;
- ``first 4``: the evaluation path's first 4 records with an image, decoded;
- ``decode everything``: what reading the whole file used to cost (``json.load`` + every image decoded),
  on the first 5,000 records only.

Results: ``benchmarks/results/data.csv`` and ``data.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

STEPS = {
    "index": """
from compression.data.sources import open_source
source = open_source(PATH, "train")
result = {"records": len(source)}
""",
    "select 5 %": """
from compression.data.sources import open_source, select
source = open_source(PATH, "train")
selection = select(source, fraction=0.05, seed=0)
t = time.perf_counter()
batch = [selection[i] for i in range(16)]
result = {"records": len(selection), "decoded": sum(len(r.images) for r in batch),
          "batch_of_16_s": time.perf_counter() - t}
""",
    "first 4": """
from compression.data.sources import open_source, select
selection = select(open_source(PATH, "eval"), samples=4, need_images=True)
result = {"records": len(selection), "decoded": sum(len(r.images) for r in selection.records)}
""",
    "decode everything (first 5,000)": """
import json
from PIL import Image
records = json.load(open(PATH))[:5000]
root = __import__("pathlib").Path(PATH).parent
images = [Image.open(root / r["image"]).convert("RGB") for r in records if r.get("image")]
result = {"records": len(records), "decoded": len(images)}
""",
}
CHILD = """
import json, sys, time
sys.path.insert(0, {root!r})
PATH = {path!r}
start = time.perf_counter()
{body}
result["seconds"] = time.perf_counter() - start
from compression.measure.peaks import peak_rss_bytes
result["peak_rss_mb"] = peak_rss_bytes() / 2**20
print(json.dumps(result))
"""
BASELINE = """
import json, sys
sys.path.insert(0, {root!r})
from compression.measure.peaks import peak_rss_bytes
print(json.dumps({{"peak_rss_mb": peak_rss_bytes() / 2**20}}))
"""


def write_mix(folder: Path, records: int, images: int, seed: int = 0) -> Path:
    """A LLaVA mix-shaped JSON file of ``records`` records over a pool of ``images`` 336x336 PNGs."""
    rng = np.random.default_rng(seed)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        pixels = rng.integers(0, 255, (336, 336, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / "images" / f"{i:05d}.png", compress_level=1)
    path = folder / "mix.json"
    with open(path, "w") as f:
        f.write("[\n")
        for i in range(records):
            turns = [{"from": "human", "value": ("<image>\n" if i % 2 else "") + f"Question {i} about the picture?"
                      + ("" if i % 2 else "\n<image>")},
                     {"from": "gpt", "value": f"An answer with a few words, number {i}."}]
            if i % 3 == 0:
                turns += [{"from": "human", "value": "And a follow-up, with \"quotes\" and {braces}?"},
                          {"from": "gpt", "value": "A second reply [with brackets]."}]
            record = {"id": f"r{i}", "conversations": turns}
            if i % 10 != 9:  # 10 % text-only, as in the LLaVA mix
                record["image"] = f"images/{i % images:05d}.png"
            else:
                record["conversations"][0]["value"] = record["conversations"][0]["value"].replace("<image>", "")
            f.write(json.dumps(record) + (",\n" if i < records - 1 else "\n"))
        f.write("]\n")
    return path


def run_step(name: str, path: Path, cache: Path) -> dict:
    env = {"COMPRESSION_CACHE": str(cache), "PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1"}
    code = CHILD.format(root=str(ROOT), path=str(path), body=STEPS[name])
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=100_000)
    parser.add_argument("--images", type=int, default=2000, help="distinct PNG files the records point at")
    parser.add_argument("--work", default="/tmp/bench-data", help="where the generated file and images go")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    path = write_mix(work, args.records, args.images)
    print(f"wrote {args.records:,} records ({path.stat().st_size / 1e6:.1f} MB) over {args.images} images "
          f"in {time.perf_counter() - t:.1f} s")
    baseline = json.loads(subprocess.run([sys.executable, "-c", BASELINE.format(root=str(ROOT))], capture_output=True, text=True,
                                         check=True).stdout)["peak_rss_mb"]
    rows = []
    for cached in (False, True):
        cache = work / "cache"
        if not cached:
            import shutil

            shutil.rmtree(cache, ignore_errors=True)
        for name in STEPS:
            if cached and name.startswith("decode everything"):
                continue
            result = run_step(name, path, cache)
            label = name + (" (index cached)" if cached else "")
            rows.append({"step": label, **result})
            print(f"{label:38} {result['seconds']:7.2f} s  peak RSS {result['peak_rss_mb']:7.0f} MB  "
                  + ", ".join(f"{k} {v}" for k, v in result.items() if k not in ("seconds", "peak_rss_mb")))
    keys = sorted({k for r in rows for k in r}, key=lambda k: (k != "step", k))
    with open(out / "data.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Reading LLaVA-format data lazily ({args.records:,} records, {path.stat().st_size / 1e6:.0f} MB)", "",
             f"Command: `.venv/bin/python benchmarks/bench_data.py --records {args.records} --images {args.images}`. "
             f"Each step in a fresh process; peak RSS includes the interpreter and imports "
             f"(a bare interpreter: {baseline:.0f} MB). The machine's 2 cores were shared with other work.", "",
             "| step | seconds | peak RSS (MB) | records | images decoded |", "| --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r.get('records', '')} | "
                     f"{r.get('decoded', '')} |")
    (out / "data.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / 'data.csv'} and {out / 'data.md'}")


if __name__ == "__main__":
    main()
