"""The language models the families embed, by the text config's ``model_type``.

Names read from transformers 5.23's modeling files (``models/<name>/modeling_<name>.py``): every one
has ``self_attn`` and ``mlp`` in its decoder layer; Phi names its output projection ``dense`` and its
MLP ``fc1``/``fc2`` (ungated); Phi-3 fuses q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``;
Qwen3 and Gemma 3 normalise q and k per head (``q_norm``/``k_norm``, weight of ``head_dim``);
Qwen2 (and the Qwen2-VL / 2.5-VL text models) have q/k/v biases; the Qwen2-VL / 2.5-VL text attention
computes ``head_dim = hidden_size // num_attention_heads`` (ignoring ``config.head_dim``), so a model with
fewer heads cannot be described by their config: their heads are not pruned.
"""
from __future__ import annotations

from compression.models.anatomy import ModelLoadError
from compression.models.families.base import TextStack

_STACKS = [
    TextStack("llama"),
    TextStack("mistral"),
    TextStack("gemma"),
    TextStack("gemma2"),
    TextStack("qwen2", qkv_bias=True),
    # Qwen2VLAttention / Qwen2_5_VLAttention: head_dim = hidden_size // num_attention_heads
    TextStack("qwen2_vl_text", qkv_bias=True, heads_prunable=False),
    TextStack("qwen2_5_vl_text", qkv_bias=True, heads_prunable=False),
    TextStack("qwen3", head_norms=("q_norm", "k_norm")),
    TextStack("qwen3_vl_text", head_norms=("q_norm", "k_norm")),
    TextStack("gemma3_text", head_norms=("q_norm", "k_norm")),
    TextStack("phi", attention=("q_proj", "k_proj", "v_proj", "dense"), mlp=(None, "fc1", "fc2")),
    TextStack("phi3", attention=("qkv_proj", "qkv_proj", "qkv_proj", "o_proj"), mlp=("gate_up_proj", "gate_up_proj",
                                                                                   "down_proj"),
              fused=("qkv_proj", "gate_up_proj")),
]
TEXT_STACKS: dict[str, TextStack] = {s.name: s for s in _STACKS}


def text_stack(model_type: str, family: str, supported: tuple[str, ...]) -> TextStack:
    """The stack of a language model ``model_type`` inside ``family``; one line when it is not supported."""
    if model_type not in TEXT_STACKS or model_type not in supported:
        raise ModelLoadError(f"unsupported architecture: {family} with language model {model_type!r}; "
                             f"supported: {', '.join(supported)}")
    return TEXT_STACKS[model_type]
