"""The circuit of a fact and how faithful it is: top edges by |score| against random circuits.

A circuit keeps k edges clean and gives every other edge its corrupted value
(`EdgeAttributor.faithfulness`). The curve runs k over fractions of all edges, for the top
edges by |score| and for `n_random` circuits of k edges drawn uniformly from all edges
(seeded by `seed` and the prompt, so reruns draw the same circuits).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from .circuits import EdgeAttribution, EdgeAttributor, top_edge_indices
from .graph import Graph

FRACTIONS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)


@dataclass
class FaithfulnessCurve:
    fractions: np.ndarray  # [F] fraction of all edges kept
    edges: np.ndarray  # [F] number of edges kept
    circuit: np.ndarray  # [F] faithfulness of the top edges
    random: np.ndarray  # [n_random, F] faithfulness of random circuits of the same sizes


def edge_counts(graph: Graph, fractions) -> np.ndarray:
    return np.array([max(1, min(graph.num_edges, round(f * graph.num_edges))) for f in fractions])


def circuit_mask(scores: np.ndarray, graph: Graph, k: int) -> np.ndarray:
    """[senders, receivers] bool: the k edges of largest |score|."""
    mask = np.zeros(graph.valid.shape, dtype=bool)
    mask.flat[top_edge_indices(scores, graph, k)] = True
    return mask


def random_mask(graph: Graph, k: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros(graph.valid.shape, dtype=bool)
    mask.flat[rng.choice(np.flatnonzero(graph.valid), size=k, replace=False)] = True
    return mask


def faithfulness_curve(eap: EdgeAttributor, result: EdgeAttribution, fractions=FRACTIONS, n_random: int = 3,
                       seed: int = 0, corrupted_target: str | None = None) -> FaithfulnessCurve:
    """Faithfulness of the fact's top-k circuit and of `n_random` random ones, for every k."""
    graph = eap.graph
    ks = edge_counts(graph, fractions)
    rng = np.random.default_rng([seed, int(hashlib.sha256(result.prompt.encode()).hexdigest()[:8], 16)])
    masks = [circuit_mask(result.scores, graph, k) for k in ks]
    masks += [random_mask(graph, k, rng) for _ in range(n_random) for k in ks]
    values = eap.faithfulness(result, np.stack(masks), corrupted_target)
    return FaithfulnessCurve(np.asarray(fractions, dtype=float), ks, values[: len(ks)],
                             values[len(ks):].reshape(n_random, len(ks)))


def relation_circuit(circuits: list[np.ndarray], share: float) -> np.ndarray:
    """[senders, receivers] bool: the edges in at least `share` of the facts' circuits (like
    relation neurons: shared by that fraction of a relation's facts)."""
    if not circuits:
        raise ValueError("a relation circuit needs at least one fact's circuit")
    return np.mean(np.stack(circuits), axis=0) >= share
