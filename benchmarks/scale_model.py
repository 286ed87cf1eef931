"""A LLaVA-1.5-7B-shaped model folder with only N decoder layers and random weights, written to disk.

    .venv/bin/python benchmarks/scale_model.py --layers 2 --out /tmp/llava-scale-2        # fp32, ~3.7 GB
    .venv/bin/python benchmarks/scale_model.py --layers 8 --dtype bf16 --out /tmp/llava-scale-8-bf16
    .venv/bin/python benchmarks/scale_model.py --layers 2 --kv-heads 8 --out /tmp/llava-scale-gqa  # GQA variant

Dimensions are those of ``llava-hf/llava-1.5-7b-hf`` (``compression/assets/configs/llava-1.5-7b.json``):

- language model: Llama, hidden 4096, 32 heads x 128 (32 KV heads: multi-head attention, as in
  LLaVA-1.5; ``kv_heads`` gives fewer), intermediate 11008, vocabulary 32064, untied LM head;
- vision tower: CLIP ViT-L/14 at 336 px (hidden 1024, 24 layers, 16 heads, intermediate 4096,
  patch 14 -> 576 patches + CLS), ``vision_feature_layer`` -2, strategy ``default`` (CLS dropped):
  576 visual tokens per image;
- projector: 2-layer MLP with GELU, 1024 -> 4096 -> 4096.

The folder is what a real checkpoint looks like: sharded safetensors (~2 GB a shard) with a
``model.safetensors.index.json``, key names as ``LlavaForConditionalGeneration.save_pretrained``
writes them in transformers 5 (``language_model.model.layers.0...``, ``vision_tower.encoder...``,
``multi_modal_projector.linear_1``, ``language_model.lm_head``), a ``config.json``, and a working
processor (``LlavaProcessor``: ``CLIPImageProcessor`` at 336 px with OpenAI-CLIP statistics, a
byte-level BPE tokenizer padded with filler tokens to 32,000 ids plus ``<image>`` = 32000 and
``<pad>`` = 32001 and unused ids up to 32,064, as llava-hf's; a llava-hf-style chat template).
It loads with ``compression.models.load(folder)`` and with plain ``from_pretrained``.

Weights are built tensor by tensor and written shard by shard (``safetensors.torch.save_file``),
so the whole model is never in memory: peak is one shard. Linear and embedding weights are
normal(0, 0.02) (transformers' ``initializer_range``), biases 0, norms 1, so activations stay
finite through the layers. Drawing 2 billion normals costs minutes on a small CPU, so one pool of
2^27 i.i.d. draws is made and each tensor is a contiguous window of it at an offset seeded by the
tensor's name (no tensor repeats within itself; two tensors may overlap, which no timing or memory
figure can notice). The layers a 2-layer and an 8-layer model share are identical.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
LLAVA_7B_CONFIG = REPO / "compression" / "assets" / "configs" / "llava-1.5-7b.json"
SHARD_BYTES = 2_000_000_000
INIT_STD = 0.02
POOL_SIZE = 1 << 27  # 134 M normal draws, more than the largest tensor (the 131 M-entry embedding)
VOCAB = 32064
IMAGE_TOKEN_ID, PAD_TOKEN_ID = 32000, 32001
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# llava-hf/llava-1.5-7b-hf's template: "USER: <image>\n<text> ASSISTANT: <answer></s>"
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] != 'system' %}{{ message['role'].upper() + ': ' }}{% endif %}"
    "{% if message['content'] is string %}{{ message['content'] + ' ' }}{% else %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: str  # "normal" (std INIT_STD), "ones", "zeros"

    def nbytes(self, dtype: torch.dtype) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * torch.empty((), dtype=dtype).element_size()


def config_dict(layers: int, kv_heads: int | None = None, dtype: str = "fp32", shrink: dict | None = None) -> dict:
    """LLaVA-1.5-7B's config with ``layers`` decoder layers (and ``kv_heads`` KV heads if given).

    ``shrink`` (tests only): ``{"text_config": {...}, "vision_config": {...}}`` fields to override.
    """
    raw = json.loads(LLAVA_7B_CONFIG.read_text())
    raw.pop("_source", None)
    for part, fields in (shrink or {}).items():
        raw[part].update(fields)
    text = raw["text_config"]
    if layers < 1:
        raise ValueError(f"layers {layers} must be at least 1")
    heads = text["num_attention_heads"]
    kv = kv_heads or text["num_key_value_heads"]
    if heads % kv:
        raise ValueError(f"kv_heads {kv} must divide the {heads} attention heads")
    text.update(num_hidden_layers=layers, num_key_value_heads=kv, head_dim=text["hidden_size"] // heads,
                pad_token_id=PAD_TOKEN_ID, bos_token_id=1, eos_token_id=2, rope_theta=10000.0,
                initializer_range=INIT_STD)
    raw["vision_config"].update(hidden_act="quick_gelu", layer_norm_eps=1e-5)
    raw["dtype"] = {"fp32": "float32", "bf16": "bfloat16"}[dtype]
    return raw


def tensor_specs(config: dict) -> list[TensorSpec]:
    """Every stored tensor, named as transformers 5's ``save_pretrained`` names it for LLaVA."""
    t, v = config["text_config"], config["vision_config"]
    h, inter, hd = t["hidden_size"], t["intermediate_size"], t["head_dim"]
    q, kv = t["num_attention_heads"] * hd, t["num_key_value_heads"] * hd
    specs = [TensorSpec("language_model.model.embed_tokens.weight", (t["vocab_size"], h), "normal")]
    for i in range(t["num_hidden_layers"]):
        p = f"language_model.model.layers.{i}."
        specs += [TensorSpec(p + "input_layernorm.weight", (h,), "ones"),
                  TensorSpec(p + "self_attn.q_proj.weight", (q, h), "normal"),
                  TensorSpec(p + "self_attn.k_proj.weight", (kv, h), "normal"),
                  TensorSpec(p + "self_attn.v_proj.weight", (kv, h), "normal"),
                  TensorSpec(p + "self_attn.o_proj.weight", (h, q), "normal"),
                  TensorSpec(p + "post_attention_layernorm.weight", (h,), "ones"),
                  TensorSpec(p + "mlp.gate_proj.weight", (inter, h), "normal"),
                  TensorSpec(p + "mlp.up_proj.weight", (inter, h), "normal"),
                  TensorSpec(p + "mlp.down_proj.weight", (h, inter), "normal")]
    specs += [TensorSpec("language_model.model.norm.weight", (h,), "ones"),
              TensorSpec("language_model.lm_head.weight", (t["vocab_size"], h), "normal")]
    vh, vi, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    positions = (v["image_size"] // patch) ** 2 + 1
    specs += [TensorSpec("vision_tower.embeddings.class_embedding", (vh,), "normal"),
              TensorSpec("vision_tower.embeddings.patch_embedding.weight", (vh, 3, patch, patch), "normal"),
              TensorSpec("vision_tower.embeddings.position_embedding.weight", (positions, vh), "normal"),
              TensorSpec("vision_tower.pre_layrnorm.weight", (vh,), "ones"),
              TensorSpec("vision_tower.pre_layrnorm.bias", (vh,), "zeros")]
    for i in range(v["num_hidden_layers"]):
        p = f"vision_tower.encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [TensorSpec(p + f"self_attn.{proj}.weight", (vh, vh), "normal"),
                      TensorSpec(p + f"self_attn.{proj}.bias", (vh,), "zeros")]
        specs += [TensorSpec(p + "layer_norm1.weight", (vh,), "ones"), TensorSpec(p + "layer_norm1.bias", (vh,), "zeros"),
                  TensorSpec(p + "mlp.fc1.weight", (vi, vh), "normal"), TensorSpec(p + "mlp.fc1.bias", (vi,), "zeros"),
                  TensorSpec(p + "mlp.fc2.weight", (vh, vi), "normal"), TensorSpec(p + "mlp.fc2.bias", (vh,), "zeros"),
                  TensorSpec(p + "layer_norm2.weight", (vh,), "ones"), TensorSpec(p + "layer_norm2.bias", (vh,), "zeros")]
    specs += [TensorSpec("vision_tower.post_layernorm.weight", (vh,), "ones"),
              TensorSpec("vision_tower.post_layernorm.bias", (vh,), "zeros"),
              TensorSpec("multi_modal_projector.linear_1.weight", (h, vh), "normal"),
              TensorSpec("multi_modal_projector.linear_1.bias", (h,), "zeros"),
              TensorSpec("multi_modal_projector.linear_2.weight", (h, h), "normal"),
              TensorSpec("multi_modal_projector.linear_2.bias", (h,), "zeros")]
    return specs


_POOL: list[torch.Tensor] = []


def _pool() -> torch.Tensor:
    if not _POOL:
        _POOL.append(torch.empty(POOL_SIZE).normal_(0.0, INIT_STD, generator=torch.Generator().manual_seed(0)))
    return _POOL[0]


def _build(spec: TensorSpec, dtype: torch.dtype) -> torch.Tensor:
    """Ones, zeros, or a window of the shared normal pool at an offset seeded by the tensor's name."""
    if spec.init == "ones":
        return torch.ones(spec.shape, dtype=dtype)
    if spec.init == "zeros":
        return torch.zeros(spec.shape, dtype=dtype)
    pool, n = _pool(), math.prod(spec.shape)
    start = zlib.crc32(spec.name.encode()) % POOL_SIZE
    if start + n <= POOL_SIZE:
        window = pool[start:start + n].to(dtype, copy=True)
    else:
        window = torch.cat([pool[start:], pool[:start + n - POOL_SIZE]]).to(dtype)
    return window.view(spec.shape)


def build_tokenizer():
    """A byte-level BPE (trained on a little English) padded to llava-hf's 32,064 ids.

    Ids 0-2 are ``<unk>``, ``<s>``, ``</s>`` as in Llama; learned tokens follow; filler tokens
    ``<filler_k>`` take the rest up to 31,999; 32000 is ``<image>``, 32001 ``<pad>``, 32002-32063
    ``<unused_k>`` (llava-hf pads its embedding matrix to a multiple of 64 the same way).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from compression.data import shapes

    learner = Tokenizer(models.BPE(unk_token="<unk>"))
    learner.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    corpus = [shapes.prompt(s.question) + " " + s.answer for s in (shapes.generate("train", i) for i in range(200))]
    corpus += ["the quick brown fox jumps over the lazy dog", "describe the image in detail",
               "what is shown in this picture ?", "answer the question using a single word or phrase ."]
    trainer = trainers.BpeTrainer(vocab_size=2000, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    learner.train_from_iterator(corpus, trainer)
    learned = json.loads(learner.to_str())["model"]
    vocab = dict(learned["vocab"])
    # fillers are ordinary vocabulary entries that no merge produces: cheap, unlike 30,000 added tokens
    vocab.update({f"<filler_{i}>": i for i in range(len(vocab), IMAGE_TOKEN_ID)})
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<unk>", "<s>", "</s>", "<image>", "<pad>"]
                           + [f"<unused_{i}>" for i in range(PAD_TOKEN_ID + 1, VOCAB)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == VOCAB and tok.token_to_id("<image>") == IMAGE_TOKEN_ID \
        and tok.token_to_id("<pad>") == PAD_TOKEN_ID, "tokenizer ids do not match llava-hf's"
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", extra_special_tokens={"image_token": "<image>"},
                                   padding_side="left", model_max_length=4096)


def build_processor(config: dict):
    from transformers import CLIPImageProcessor, LlavaProcessor

    v = config["vision_config"]
    side = v["image_size"]
    if config["text_config"]["vocab_size"] != VOCAB:
        raise ValueError(f"vocab_size {config['text_config']['vocab_size']} must stay {VOCAB} (the tokenizer's)")
    image_processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side},
                                         image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
    return LlavaProcessor(image_processor=image_processor, tokenizer=build_tokenizer(), patch_size=v["patch_size"],
                          vision_feature_select_strategy=config["vision_feature_select_strategy"],
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def write_scale_model(out: str | Path, layers: int, dtype: str = "fp32", kv_heads: int | None = None,
                      shard_bytes: int = SHARD_BYTES, shrink: dict | None = None) -> Path:
    """Write the folder at ``out`` (must not exist or be empty); nothing is visible there until complete.

    ``shrink``: see ``config_dict`` (tests write a small model with the same structure).
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    out = Path(out).expanduser()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ValueError(f"output folder {out} already exists and is not empty; expected a new folder")
    from safetensors.torch import save_file

    config = config_dict(layers, kv_heads, dtype, shrink)
    torch_dtype = DTYPES[dtype]
    specs = tensor_specs(config)
    from compression.models.shards import plan_shards

    shards = plan_shards([(spec, spec.nbytes(torch_dtype)) for spec in specs], shard_bytes)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        weight_map, total_bytes, total_params = {}, 0, 0
        for k, shard in enumerate(shards, start=1):
            name = f"model-{k:05d}-of-{len(shards):05d}.safetensors"
            tensors = {}
            for spec in shard:
                tensors[spec.name] = _build(spec, torch_dtype)
                weight_map[spec.name] = name
                total_bytes += spec.nbytes(torch_dtype)
                total_params += tensors[spec.name].numel()
            save_file(tensors, tmp / name, metadata={"format": "pt"})
            os.chmod(tmp / name, 0o644)
            del tensors
        index = {"metadata": {"total_parameters": total_params, "total_size": total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(
            {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": PAD_TOKEN_ID}, indent=2) + "\n")
        build_processor(config).save_pretrained(tmp)
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def expected_bytes(layers: int, dtype: str = "fp32", kv_heads: int | None = None, shrink: dict | None = None) -> int:
    """Bytes the safetensors shards will hold (from the shapes, before writing anything)."""
    return sum(s.nbytes(DTYPES[dtype]) for s in tensor_specs(config_dict(layers, kv_heads, dtype, shrink)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, required=True, help="decoder layers (LLaVA-1.5-7B has 32)")
    parser.add_argument("--out", required=True, help="new folder to write")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--kv-heads", type=int, default=None, help="KV heads (default 32: MHA as in LLaVA-1.5)")
    parser.add_argument("--shard-gb", type=float, default=SHARD_BYTES / 1e9)
    args = parser.parse_args(argv)
    try:
        need = expected_bytes(args.layers, args.dtype, args.kv_heads)
        free = shutil.disk_usage(Path(args.out).expanduser().resolve().parent
                                 if Path(args.out).expanduser().resolve().parent.exists() else Path.cwd()).free
        if need > free:
            raise ValueError(f"--out {args.out}: needs {need / 1e9:.1f} GB, {free / 1e9:.1f} GB free there")
        path = write_scale_model(args.out, args.layers, args.dtype, args.kv_heads, int(args.shard_gb * 1e9))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{path}: {need / 1e9:.2f} GB of {args.dtype} weights, {args.layers} decoder layers")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    raise SystemExit(main())
