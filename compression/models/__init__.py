"""Models: one loader for every source, the model's anatomy from its family description (``families``: one
module per VLM family), the reference model, pruned-model classes.

``load`` and its companions are re-exported here (``from compression.models import load``);
the loader itself is ``compression.models.loader``, the pickable models ``compression.models.catalog``.
Importing this package imports no torch: each name is imported on first use (PEP 562 module
``__getattr__``), so the dashboard lists models and paints before torch loads (issue 12).
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_HOME = {"available_models": "catalog", "shipped_configs": "catalog"}  # everything else: loader
__all__ = ["Anatomy", "LoadedModel", "ModelLoadError", "anatomy_from_config", "available_models",
           "fingerprint_folder", "load", "load_processor", "model_from_config", "parameter_counts",
           "shipped_configs", "tensor_bytes"]

if TYPE_CHECKING:
    from compression.models.catalog import available_models, shipped_configs
    from compression.models.loader import (Anatomy, LoadedModel, ModelLoadError, anatomy_from_config,
                                           fingerprint_folder, load, load_processor, model_from_config,
                                           parameter_counts, tensor_bytes)


def __getattr__(name: str):
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"compression.models.{_HOME.get(name, 'loader')}"), name)
    globals()[name] = value  # later look-ups skip this function
    return value
