"""Arrow schemas of the tables the downstream stages read and write.

The input tables (prompts, neurons, activations) are the contract written by `kn-ray
attribute`; EDITS is the subset of the edit stage's table (kn_ray.stages.edit_tables) that
the report reads. Extra columns are harmless. The output tables are written by
`kn-ray aggregate`.
"""

from __future__ import annotations

import pyarrow as pa

from kn_ray.pipeline import tables

# The attribute stage's contract (docs/output-schema.md), defined by the pipeline.
PROMPTS, NEURONS, ACTIVATIONS = tables.PROMPTS, tables.NEURONS, tables.ACTIVATIONS

# One row per (op, fact, prompt, condition). Probability rows carry prob_before/after and
# rel_change; update/erase may add metric rows (metric name + value, probabilities null).
EDITS = pa.schema([
    ("op", pa.string()),  # suppress | amplify | update | erase
    ("relation", pa.string()),
    ("fact_id", pa.string()),
    ("prompt_id", pa.string()),
    ("condition", pa.string()),  # kn | activation | random | other_relation | ...
    ("prob_before", pa.float64()),
    ("prob_after", pa.float64()),
    ("rel_change", pa.float64()),
    ("metric", pa.string()),
    ("value", pa.float64()),
])

KNOWLEDGE_NEURONS = pa.schema([
    ("fact_id", pa.string()),
    ("relation", pa.string()),
    ("layer", pa.int16()),
    ("neuron", pa.int32()),
    ("n_prompts", pa.int32()),  # usable prompts where the neuron was coarse
    ("share", pa.float64()),  # n_prompts / usable prompts of the fact
    ("mean_score", pa.float32()),  # mean score (ig) or activation (activation) over those prompts
    ("method", pa.string()),  # ig | activation
])

RELATION_NEURONS = pa.schema([
    ("relation", pa.string()),
    ("layer", pa.int16()),
    ("neuron", pa.int32()),
    ("n_facts", pa.int32()),  # facts of the relation with this knowledge neuron
    ("share", pa.float64()),  # n_facts / facts of the relation with a usable prompt
    ("method", pa.string()),
])

TABLES = {"prompts": PROMPTS, "neurons": NEURONS, "activations": ACTIVATIONS, "edits": EDITS,
          "knowledge_neurons": KNOWLEDGE_NEURONS, "relation_neurons": RELATION_NEURONS}
