"""Real-ESRGAN networks as torch modules, their weight readers, detection and the named-model catalog."""

from vidscale.models.arch import RRDBNet, SRVGGNetCompact
from vidscale.models.catalog import CatalogEntry, LoadedModel, catalog_entries, model_names, resolve
from vidscale.models.detect import ModelSpec, detect
from vidscale.models.readers import load_weights, read_ncnn

__all__ = [
    "CatalogEntry",
    "LoadedModel",
    "ModelSpec",
    "RRDBNet",
    "SRVGGNetCompact",
    "catalog_entries",
    "detect",
    "load_weights",
    "model_names",
    "read_ncnn",
    "resolve",
]
