"""Converting an original-format LLaVA checkpoint at scale: time, and memory against the model's size.

    .venv/bin/python benchmarks/bench_convert.py                          # ~1.2 B parameters, a few minutes
    .venv/bin/python benchmarks/bench_convert.py --hidden 256 --layers 2 --intermediate 512 --vision-layers 2 \\
        --out /tmp/bench-convert                                          # a quick look
    .venv/bin/python benchmarks/bench_convert.py --hidden 4096 --layers 32 --intermediate 11008   # LLaVA-1.5-7B sizes

It writes a random checkpoint in LLaVA-1.5's own layout (``LlavaLlamaForCausalLM`` config, fp16
``pytorch_model-0000k-of-0000n.bin`` shards with their index, a 32,000-token Llama tokenizer) and, apart, a CLIP
ViT-L/14-336-shaped tower folder (fp32 ``model.safetensors``, as openai ships it), then runs ``python -m compression
convert`` in a fresh process, sampling its memory every 20 ms: peak anonymous memory (``RssAnon``: what the
converter holds) and peak resident set (``VmHWM``, which also counts the pages of the memory-mapped source shards).
The converter holds at most one output shard (2 GB by default) plus the embedding matrix's statistics, never the
model twice.

Results: ``benchmarks/results/convert.csv`` and ``convert.md``.
"""
from __future__ import annotations

import argparse
import csv
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

CHILD = """
import json, sys, threading, time
sys.path.insert(0, {root!r})
peak = {{"anon_kb": 0, "hwm_kb": 0}}
def sample():
    while True:
        fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
        peak["anon_kb"] = max(peak["anon_kb"], int(fields["RssAnon"].split()[0]))
        peak["hwm_kb"] = int(fields["VmHWM"].split()[0])
        time.sleep(0.02)
threading.Thread(target=sample, daemon=True).start()
start = time.perf_counter()
from compression.cli.main import main
import transformers
for name in ("LlavaForConditionalGeneration", "LlavaConfig", "LlavaProcessor", "LlamaTokenizer", "LlamaConfig",
             "CLIPVisionConfig", "LlavaImageProcessor", "AutoTokenizer", "AutoConfig", "GenerationConfig"):
    getattr(transformers, name)  # transformers imports lazily: pay for it before the clock starts
imports = time.perf_counter() - start
start = time.perf_counter()
code = main({argv!r})
seconds = time.perf_counter() - start
time.sleep(0.05)
print(json.dumps({{"code": code, "seconds": seconds, "import_seconds": imports, "peak_anon_mb": peak["anon_kb"] / 1024,
                  "peak_rss_mb": peak["hwm_kb"] / 1024}}))
"""


def llama_tokenizer(size: int):
    """A Llama tokenizer (byte fallback) with ``size`` tokens, as LLaVA-1.5's Vicuna tokenizer has 32,000."""
    from itertools import product

    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{b:02X}>": 3 + b for b in range(256)}}
    letters = "abcdefghijklmnopqrstuvwxyz"
    for ch in "▁" + letters:
        vocab.setdefault(ch, len(vocab))
    for n in (1, 2, 3, 4):
        for combo in product(letters, repeat=n):
            if len(vocab) >= size:
                break
            vocab.setdefault("▁" + "".join(combo), len(vocab))
    return LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab), unk_token="<unk>", bos_token="<s>",
                          eos_token="</s>", pad_token="<unk>")


def _random(shape, dtype, generator) -> torch.Tensor:
    return (torch.randn(shape, generator=generator) * 0.02).to(dtype)


def write_checkpoint(folder: Path, hidden: int, layers: int, intermediate: int, vocab: int, vision_hidden: int,
                     vision_layers: int, shard_params: int = 400_000_000) -> tuple[Path, Path, int, int]:
    """``(checkpoint, tower folder, language-model parameters, tower parameters)``, written shard by shard."""
    generator = torch.Generator().manual_seed(0)
    ckpt, tower = folder / "llava-original", folder / "clip-tower"
    ckpt.mkdir(parents=True)
    tower.mkdir()
    shapes = {"model.embed_tokens.weight": (vocab, hidden), "model.norm.weight": (hidden,),
              "lm_head.weight": (vocab, hidden), "model.mm_projector.0.weight": (hidden, vision_hidden),
              "model.mm_projector.0.bias": (hidden,), "model.mm_projector.2.weight": (hidden, hidden),
              "model.mm_projector.2.bias": (hidden,)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes.update({p + f"self_attn.{n}_proj.weight": (hidden, hidden) for n in "qkvo"})
        shapes.update({p + "mlp.gate_proj.weight": (intermediate, hidden), p + "mlp.up_proj.weight": (intermediate, hidden),
                       p + "mlp.down_proj.weight": (hidden, intermediate), p + "input_layernorm.weight": (hidden,),
                       p + "post_attention_layernorm.weight": (hidden,)})
    groups, current, count = [], [], 0
    for key, shape in shapes.items():
        current.append(key)
        count += torch.Size(shape).numel()
        if count >= shard_params:
            groups.append(current)
            current, count = [], 0
    groups += [current] if current else []
    weight_map = {}
    for n, keys in enumerate(groups):
        name = f"pytorch_model-{n + 1:05d}-of-{len(groups):05d}.bin"
        torch.save({k: _random(shapes[k], torch.float16, generator) for k in keys}, ckpt / name)
        weight_map.update({k: name for k in keys})
    (ckpt / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = {"architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": hidden // 128, "vocab_size": vocab, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "rope_theta": 10000.0, "bos_token_id": 1,
              "eos_token_id": 2, "pad_token_id": 0, "tie_word_embeddings": False, "torch_dtype": "float16",
              "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": vision_hidden,
              "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
              "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False}
    (ckpt / "config.json").write_text(json.dumps(config, indent=1))
    llama_tokenizer(vocab).save_pretrained(ckpt)

    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig

    vision = CLIPVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                              num_hidden_layers=vision_layers, num_attention_heads=vision_hidden // 64,
                              image_size=336, patch_size=14, projection_dim=768)
    vision.save_pretrained(tower)
    v, patches = vision_hidden, (336 // 14) ** 2
    tensors = {"vision_model.embeddings.class_embedding": (v,), "vision_model.embeddings.patch_embedding.weight":
               (v, 3, 14, 14), "vision_model.embeddings.position_embedding.weight": (patches + 1, v),
               "vision_model.pre_layrnorm.weight": (v,), "vision_model.pre_layrnorm.bias": (v,),
               "vision_model.post_layernorm.weight": (v,), "vision_model.post_layernorm.bias": (v,)}
    for i in range(vision_layers):
        p = f"vision_model.encoder.layers.{i}."
        for n in ("q", "k", "v", "out"):
            tensors.update({p + f"self_attn.{n}_proj.weight": (v, v), p + f"self_attn.{n}_proj.bias": (v,)})
        tensors.update({p + "mlp.fc1.weight": (4 * v, v), p + "mlp.fc1.bias": (4 * v,), p + "mlp.fc2.weight": (v, 4 * v),
                        p + "mlp.fc2.bias": (v,), p + "layer_norm1.weight": (v,), p + "layer_norm1.bias": (v,),
                        p + "layer_norm2.weight": (v,), p + "layer_norm2.bias": (v,)})
    save_file({k: _random(s, torch.float32, generator) for k, s in tensors.items()}, str(tower / "model.safetensors"))
    language = sum(torch.Size(s).numel() for s in shapes.values())
    return ckpt, tower, language, sum(torch.Size(s).numel() for s in tensors.values())


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--intermediate", type=int, default=5504)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--vision-hidden", type=int, default=1024, help="CLIP ViT-L/14-336: 1024")
    parser.add_argument("--vision-layers", type=int, default=24, help="CLIP ViT-L/14-336: 24")
    parser.add_argument("--work", default="/tmp/bench-convert-work", help="where the generated checkpoint goes")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = parser.parse_args()
    work, out = Path(args.work), Path(args.out)
    shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    ckpt, tower, language, vision = write_checkpoint(work, args.hidden, args.layers, args.intermediate, args.vocab,
                                                     args.vision_hidden, args.vision_layers)
    source = folder_bytes(ckpt) + folder_bytes(tower)
    print(f"wrote a {(language + vision) / 1e9:.2f} B-parameter checkpoint ({source / 1e9:.2f} GB: fp16 language "
          f"model + fp32 tower) in {time.perf_counter() - t:.0f} s")
    dest = work / "llava-hf"
    argv = ["convert", str(ckpt), "--to", str(dest), "--vision-tower", str(tower), "--json"]
    env = {"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), argv=argv)], capture_output=True,
                          text=True, env=env, timeout=7200)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise SystemExit(f"convert failed: {done.stderr[-2000:]}")
    result = json.loads(lines[-1])
    report = json.loads("\n".join(lines[:-1]))
    written = folder_bytes(dest)
    row = {"parameters": language + vision, "source_gb": source / 1e9, "written_gb": written / 1e9,
           "seconds": result["seconds"], "import_seconds": result["import_seconds"], "peak_anon_mb": result["peak_anon_mb"], "peak_rss_mb": result["peak_rss_mb"],
           "shards": report["shards"], "rows": f"{report['vocab_rows_before']} -> {report['vocab_rows_after']}"}
    print(f"converted in {row['seconds']:.0f} s (after {row['import_seconds']:.0f} s of imports): peak anonymous memory {row['peak_anon_mb']:.0f} MB, peak RSS "
          f"{row['peak_rss_mb']:.0f} MB (with mapped source pages); wrote {row['written_gb']:.2f} GB in "
          f"{row['shards']} shard(s); embedding rows {row['rows']}")
    with open(out / "convert.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(row))
        writer.writeheader()
        writer.writerow(row)
    command = " ".join(["benchmarks/bench_convert.py"] + [f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items()
                                                          if k not in ("work", "out")])
    (out / "convert.md").write_text("\n".join([
        f"# Converting an original LLaVA checkpoint ({row['parameters'] / 1e9:.2f} B parameters)", "",
        f"Command: `.venv/bin/python {command}`. A random checkpoint in LLaVA-1.5's layout (fp16 `.bin` shards, a "
        f"separate fp32 CLIP tower folder) converted by `python -m compression convert` in a fresh process; memory "
        f"sampled every 20 ms. Peak RSS also counts the memory-mapped source pages (reclaimable page cache); "
        f"anonymous memory is what the converter itself holds. The machine's 2 cores were shared with other work.", "",
        "| parameters | source (GB) | written (GB) | seconds (imports before) | peak anonymous (MB) | peak RSS (MB) | "
        "shards | embedding rows |", "| --- | --- | --- | --- | --- | --- | --- | --- |",
        f"| {row['parameters']:,} | {row['source_gb']:.2f} | {row['written_gb']:.2f} | {row['seconds']:.0f} "
        f"({row['import_seconds']:.0f}) | "
        f"{row['peak_anon_mb']:.0f} | {row['peak_rss_mb']:.0f} | {row['shards']} | {row['rows']} |", ""]))
    print(f"wrote {out / 'convert.csv'} and {out / 'convert.md'}")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
