"""`kn-ray aggregate`: knowledge neurons per fact and relation.

params   AggregateParams, the declared options
stage    aggregate(out, params): DuckDB over the attribute tables
schemas  the Arrow schemas of knowledge_neurons/, relation_neurons/, shared_neurons/, shared_neuron_facts/,
         fact_consistency/, relation_circuits/ and circuit_neurons/

Names are imported on first use, so the CLI reads AggregateParams without importing DuckDB.
"""

import importlib

_NAMES = {"AggregateParams": "params", "aggregate": "stage", "KNOWLEDGE_NEURONS": "schemas",
          "RELATION_NEURONS": "schemas", "SHARED_NEURONS": "schemas",
          "SHARED_NEURON_FACTS": "schemas", "FACT_CONSISTENCY": "schemas"}
__all__ = list(_NAMES)


def __getattr__(name: str):
    if name in _NAMES:
        return getattr(importlib.import_module(f"{__name__}.{_NAMES[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
