"""Models: one loader for every source, the model's anatomy from its family description (``families``: one
module per VLM family), the reference model, pruned-model classes.

``load`` and its companions are re-exported here (``from compression.models import load``);
the loader itself is ``compression.models.loader``.
"""
from compression.models.loader import (Anatomy, LoadedModel, ModelLoadError, anatomy_from_config,
                                       available_models, fingerprint_folder, load, load_processor,
                                       model_from_config, parameter_counts, shipped_configs, tensor_bytes)

__all__ = ["Anatomy", "LoadedModel", "ModelLoadError", "anatomy_from_config", "available_models",
           "fingerprint_folder", "load", "load_processor", "model_from_config", "parameter_counts",
           "shipped_configs", "tensor_bytes"]
