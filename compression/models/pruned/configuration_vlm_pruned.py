"""Configurations of structurally pruned vision-language models whose decoder layers have their own widths.

Self-contained (imports only transformers): ``compression.methods.prune.save_pruned`` ships this file in the
model folder, so ``from_pretrained(folder, trust_remote_code=True)`` needs no project import. One class per
family (LLaVA has its own, ``configuration_llava_pruned``): the family's config with
``model_type = "<family>_pruned"``. The text config keeps the unpruned widths (transformers' validators
still pass) and adds ``text_config.pruned_widths``: per-layer ``num_attention_heads``,
``num_key_value_heads``, ``intermediate_size``, and where to apply them (``layers``, ``attention``, ``mlp``
names), with ``head_dim`` written out.
"""
import transformers

# model_type -> (config class, model class) in transformers 5.23
FAMILIES = {
    "llava_next": ("LlavaNextConfig", "LlavaNextForConditionalGeneration"),
    "llava_onevision": ("LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration"),
    "qwen2_vl": ("Qwen2VLConfig", "Qwen2VLForConditionalGeneration"),
    "qwen2_5_vl": ("Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration"),
    "qwen3_vl": ("Qwen3VLConfig", "Qwen3VLForConditionalGeneration"),
    "gemma3": ("Gemma3Config", "Gemma3ForConditionalGeneration"),
    "paligemma": ("PaliGemmaConfig", "PaliGemmaForConditionalGeneration"),
    "internvl": ("InternVLConfig", "InternVLForConditionalGeneration"),
    "idefics3": ("Idefics3Config", "Idefics3ForConditionalGeneration"),
    "smolvlm": ("SmolVLMConfig", "SmolVLMForConditionalGeneration"),
    "mistral3": ("Mistral3Config", "Mistral3ForConditionalGeneration"),
}
CONFIGS = {}
for _model_type, (_config, _model) in FAMILIES.items():
    _name = _config.replace("Config", "PrunedConfig")
    CONFIGS[_model_type] = type(_name, (getattr(transformers, _config),),
                                {"model_type": f"{_model_type}_pruned", "__module__": __name__})
    globals()[_name] = CONFIGS[_model_type]
    CONFIGS[_model_type].register_for_auto_class()
