"""CLI ``convert SRC --to DIR``: an original LLaVA or Bunny checkpoint -> a llava-hf folder.

    python -m compression convert path/to/llava-v1.5-7b --to llava-v1.5-7b-hf --vision-tower path/to/clip-vit-large-patch14-336
    python -m compression convert path/to/Bunny-v1_0-3B --to bunny-v1.0-3b-hf --json

The work is ``compression.models.convert.convert``; bad input is one line on stderr and exit code 2.
"""
from __future__ import annotations

from compression.cli.common import emit


def _cmd_convert(args) -> int:
    from compression.models.convert import convert

    report = convert(args.src, args.to, vision_tower=args.vision_tower, dtype=args.dtype, overwrite=args.overwrite)
    start, stop = report.initialised_rows
    rows = (f"embeddings {report.vocab_rows_before} -> {report.vocab_rows_after} rows"
            if report.vocab_rows_after != report.vocab_rows_before else f"embeddings {report.vocab_rows_after} rows")
    emit(args, report.to_dict(),
         f"converted {report.format} checkpoint {report.source} -> {report.path}\n"
         f"{report.language_model} + {report.vision_tower} (tower from {report.vision_tower_from}); "
         f"<image> {report.image_token_index}, <pad> {report.pad_token_id}; {rows}, rows {start}-{stop - 1} "
         f"drawn from the old rows' mean and covariance\n"
         f"vision_feature_layer {report.vision_feature_layer}, select strategy "
         f"{report.vision_feature_select_strategy}; {report.dtype}, {report.shards} shard(s)"
         + "".join(f"\n{note}" for note in report.notes)
         + f"\nuse it with --model {report.path}")
    return 0


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert an original LLaVA (LlavaLlamaForCausalLM) or Bunny (bunny-phi) "
                                       "checkpoint into a llava-hf folder")
    p.add_argument("src", help="the original checkpoint folder (config.json, weights, tokenizer)")
    p.add_argument("--to", required=True, help="the llava-hf folder to create")
    p.add_argument("--vision-tower", help="local folder of the vision tower the checkpoint names in mm_vision_tower "
                                          "(e.g. openai/clip-vit-large-patch14-336); needed when the checkpoint holds "
                                          "no tower weights and the local hub cache has no copy")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"],
                   help="weights' dtype (auto: the language model's)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination folder")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_convert)
