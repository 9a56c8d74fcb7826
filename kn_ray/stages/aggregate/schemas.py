"""Arrow schemas of the tables `kn-ray aggregate` writes (docs/output-schema.md).

It reads the attribute stage's tables, whose schemas `kn_ray.pipeline.neuron_tables` owns.
"""

from __future__ import annotations

import pyarrow as pa

KNOWLEDGE_NEURONS = pa.schema([
    ("fact_id", pa.string()),
    ("relation", pa.string()),
    ("layer", pa.int16()),
    ("neuron", pa.int32()),
    ("n_prompts", pa.int32()),  # usable prompts where the neuron was coarse
    ("share", pa.float64()),  # n_prompts / usable prompts of the fact
    ("mean_score", pa.float32()),  # mean score (ig) or activation (activation) over those prompts
    ("method", pa.string()),  # ig | activation
    ("level", pa.string()),  # fact | relation | generic (the neuron's, over the run: shared_neurons)
])

SHARED_NEURONS = pa.schema([  # one row per (method, neuron) of level relation or generic
    ("method", pa.string()),
    ("layer", pa.int16()),
    ("neuron", pa.int32()),
    ("level", pa.string()),  # relation | generic
    ("n_facts", pa.int32()),  # facts it is a knowledge neuron of
    ("n_relations", pa.int32()),  # their relations
    ("relations", pa.list_(pa.string())),  # those relations, sorted
    ("share", pa.float64()),  # n_facts / the run's facts with a usable prompt
    ("mean_score", pa.float32()),  # mean of its knowledge-neuron rows' mean_score
])

# the (fact, neuron) rows of shared_neurons' neurons: with knowledge_neurons (fact level by
# default) every candidate of the paper's rule, which the report's overlap within vs across
# relations (the paper's Table 2) needs; same columns as knowledge_neurons
SHARED_NEURON_FACTS = KNOWLEDGE_NEURONS

FACT_CONSISTENCY = pa.schema([  # one row per (method, fact with a usable prompt)
    ("method", pa.string()),
    ("fact_id", pa.string()),
    ("relation", pa.string()),
    ("n_prompts", pa.int32()),  # usable prompts
    ("n_pairs", pa.int32()),  # pairs of them with a Jaccard (not both without coarse neurons)
    ("jaccard", pa.float64()),  # mean pairwise Jaccard of their coarse-neuron sets; null below 2 prompts
])

RELATION_CIRCUITS = pa.schema([  # a circuits run: edges shared by the circuits of a relation's facts
    ("relation", pa.string()),
    ("sender", pa.string()),
    ("receiver", pa.string()),
    ("n_facts", pa.int32()),  # facts of the relation whose circuit (top circuit_top edges) holds the edge
    ("share", pa.float64()),  # n_facts / facts of the relation with a circuit
    ("mean_score", pa.float32()),  # mean EAP-IG score over those facts' prompts
])

CIRCUIT_NEURONS = pa.schema([  # a circuits run with --neuron-run: who writes into the knowledge-neuron layers
    ("fact_id", pa.string()),
    ("relation", pa.string()),
    ("layer", pa.int16()),  # a layer holding knowledge neurons (ig) of the fact in the neuron run
    ("n_neurons", pa.int32()),  # the fact's knowledge neurons in that layer
    ("sender", pa.string()),  # a node whose edge into m{layer} is in the circuit of a prompt of the fact
    ("n_prompts", pa.int32()),  # the fact's prompts whose circuit holds that edge
    ("mean_score", pa.float32()),  # its mean EAP-IG score over them
])

RELATION_NEURONS = pa.schema([
    ("relation", pa.string()),
    ("layer", pa.int16()),
    ("neuron", pa.int32()),
    ("n_facts", pa.int32()),  # facts of the relation with this knowledge neuron
    ("share", pa.float64()),  # n_facts / facts of the relation with a usable prompt
    ("method", pa.string()),
])
