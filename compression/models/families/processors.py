"""Processors built, loaded and saved in one place, without torchvision.

The project pins CPU torch 2.13, beside which PyPI's torchvision does not import. Two kinds of stock
transformers 5.23 processors then cannot be built (facts from /work/notes/families-research.md, run here):

- those whose ``__init__`` takes a ``video_processor`` (Qwen2-VL, Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision,
  InternVL, SmolVLM): every video processor class requires torchvision, and ``video_processor=None`` is
  refused. Here they are an *image-only* subclass of the same name whose ``__init__`` has no
  ``video_processor`` parameter (``ProcessorMixin`` reads its sub-processors from that signature, so the
  video processor is never built, checked, saved or loaded);
- ``PixtralProcessor`` (Mistral 3), whose module imports the torchvision image processor: the PIL one is
  aliased in its place before the import.

Image processors are the ``...ImageProcessorPil`` classes (``AutoImageProcessor`` falls back to them).
Saving writes what the stock class reads where torchvision is installed: ``processor_class`` is the stock
name (the subclass has it), and a video-processor entry is kept in ``processor_config.json`` — the one the
model folder came with when there was one, else the stock video processor's type with the image
processor's geometry.
"""
from __future__ import annotations

import inspect
import json
import sys
from pathlib import Path
from typing import Any

from compression.models.families.base import Family

VIDEO_PROCESSOR_TYPES = {  # stock video processor of each image-only processor (transformers 5.23)
    "Qwen2VLProcessor": "Qwen2VLVideoProcessor", "Qwen2_5_VLProcessor": "Qwen2VLVideoProcessor",
    "Qwen3VLProcessor": "Qwen3VLVideoProcessor", "LlavaOnevisionProcessor": "LlavaOnevisionVideoProcessor",
    "InternVLProcessor": "InternVLVideoProcessor", "SmolVLMProcessor": "SmolVLMVideoProcessor"}
_IMAGE_ONLY: dict[str, type] = {}


def needs_image_only(family: Family) -> bool:
    """Whether the stock processor of ``family`` cannot be built without torchvision (see the module docstring)."""
    return family.video_processor or family.processor_class == "PixtralProcessor"


def processor_class(family: Family) -> type:
    """The processor class to use here: stock, image-only, or Pixtral through the PIL alias."""
    if family.processor_class == "PixtralProcessor":
        import transformers.models.pixtral.image_processing_pil_pixtral as pil

        # processing_pixtral imports the torchvision image processor module; the PIL one stands in for it
        sys.modules.setdefault("transformers.models.pixtral.image_processing_pixtral", pil)
        from transformers.models.pixtral.processing_pixtral import PixtralProcessor

        return PixtralProcessor
    stock = family.transformers_class("processor")
    if not family.video_processor:
        return stock
    if stock.__name__ == "SmolVLMProcessor":
        _num2words_for_images()
    if stock.__name__ not in _IMAGE_ONLY:
        init = _init_without_video(stock)
        # the same name as the stock class, so that save_pretrained writes a processor_class AutoProcessor knows
        _IMAGE_ONLY[stock.__name__] = type(stock.__name__, (stock,), {
            "__init__": init, "__module__": __name__, "image_only": True, **family.processor_defaults})
    return _IMAGE_ONLY[stock.__name__]


def _num2words_for_images() -> None:
    """SmolVLMProcessor refuses to start without ``num2words``, which it uses only to spell a video's frame
    count; an image-only processor never calls it, so a stand-in that says so takes its place when absent."""
    import transformers.models.smolvlm.processing_smolvlm as smolvlm

    if smolvlm.num2words is None:
        def num2words(number, *args, **kwargs):
            raise NotImplementedError("num2words is not installed: video prompts are not supported here")

        smolvlm.num2words = num2words


def _init_without_video(stock: type):
    """``stock.__init__`` with the same parameters, less ``video_processor`` (always None).

    A real function with those named parameters, not ``*args, **kwargs``: ``ProcessorMixin`` finds its
    sub-processors in ``inspect.signature(__init__)``, saves the arguments named there (``to_dict``) and
    passes back on loading those in ``__init__.__code__.co_varnames`` (``from_args_and_dict``) — InternVL's
    ``image_seq_length``, every ``chat_template``."""
    params = [p for p in inspect.signature(stock.__init__).parameters.values()
              if p.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD and p.name not in ("self", "video_processor")]
    names = [p.name for p in params]
    defaults = {p.name: None if p.default is inspect.Parameter.empty else p.default for p in params}
    source = (f"def __init__(self, {''.join(f'{n}=_defaults[{n!r}], ' for n in names)}**kwargs):\n"
              f"    _stock.__init__(self, video_processor=None, {''.join(f'{n}={n}, ' for n in names)}**kwargs)\n")
    namespace = {"_defaults": defaults, "_stock": stock}
    exec(source, namespace)  # noqa: S102 - the source is built from parameter names only
    return namespace["__init__"]


def build_processor(family: Family, image_processor, tokenizer, chat_template: str | None = None, **kwargs):
    """A processor of ``family`` from its parts (tests and converters build tiny ones this way)."""
    cls = processor_class(family)
    if chat_template is not None:
        kwargs["chat_template"] = chat_template
    return cls(image_processor=image_processor, tokenizer=tokenizer, **kwargs)


def load_processor(family: Family, path: Path, trust_remote_code: bool = False):
    """The processor of a model folder of ``family``."""
    if not needs_image_only(family):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path, trust_remote_code=trust_remote_code)
    processor = processor_class(family).from_pretrained(path)
    processor._video_config = _video_config(Path(path))  # carried through to the saved folder
    return processor


def _video_config(path: Path) -> dict[str, Any] | None:
    """The video processor's config a folder came with (``processor_config.json`` or its own file)."""
    for name, key in (("processor_config.json", "video_processor"), ("video_preprocessor_config.json", None)):
        f = path / name
        if f.is_file():
            data = json.loads(f.read_text())
            data = data.get(key) if key else data
            if isinstance(data, dict):
                return data
    return None


def save_processor(processor, folder: str | Path) -> None:
    """``processor.save_pretrained(folder)``, then what the stock class needs to load it where torchvision is."""
    folder = Path(folder)
    processor.save_pretrained(folder)
    if not getattr(processor, "image_only", False):
        return
    video_type = VIDEO_PROCESSOR_TYPES[type(processor).__name__]
    video = getattr(processor, "_video_config", None)
    if video is None:
        image = processor.image_processor.to_dict()
        keep = ("patch_size", "temporal_patch_size", "merge_size", "image_mean", "image_std", "do_normalize",
                "do_rescale", "rescale_factor", "do_convert_rgb", "size", "resample")
        video = {k: image[k] for k in keep if k in image}
    video = {**video, "video_processor_type": video.get("video_processor_type", video_type)}
    config_file = folder / "processor_config.json"
    data = json.loads(config_file.read_text()) if config_file.is_file() else {}
    data["video_processor"] = video
    tmp = config_file.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    tmp.replace(config_file)
