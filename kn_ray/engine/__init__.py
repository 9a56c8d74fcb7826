"""The engine: models and attribution. Pure torch/transformers; never imports ray."""

from .adapters import ADAPTERS, Adapter, UnsupportedArchitecture, adapter_for, supported_model_types, value_matrix
from .attribution import Attribution, Attributor
from .circuits import EdgeAttribution, EdgeAttributor
from .graph import Graph
from .encoding import SkipPrompt
from .probe import Prober, Probe
from .loading import LoadedModel, best_device, load_model
from .quadrature import RULES, quadrature

__all__ = [
    "ADAPTERS", "Adapter", "Attribution", "Attributor", "EdgeAttribution", "EdgeAttributor", "Graph", "LoadedModel", "RULES", "SkipPrompt",
    "UnsupportedArchitecture", "adapter_for", "best_device", "load_model", "quadrature",
    "supported_model_types", "value_matrix",
]
