"""Circuit results as Arrow tables (`--mode circuits`; docs/output-schema.md).

`edges`: the top edges of each prompt by |score|, ranked; `nodes`: every node's summed
outgoing and incoming edge scores; `faithfulness`: per prompt, the corrupted partner, the
metrics and the faithfulness curve (top circuits and random ones of the same sizes).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from .prompts import PromptSpec
from .neuron_tables import prompt_table

_KEYS = [("prompt_id", pa.string()), ("fact_id", pa.string()), ("relation", pa.string())]
EDGES = pa.schema(_KEYS + [("rank", pa.int32()), ("sender", pa.string()), ("receiver", pa.string()),
                           ("score", pa.float32())])
NODES = pa.schema(_KEYS + [("node", pa.string()), ("layer", pa.int16()), ("head", pa.int16()),
                           ("score_out", pa.float32()), ("score_in", pa.float32())])
FAITHFULNESS = pa.schema(_KEYS + [
    ("corrupted_prompt_id", pa.string()), ("corrupted_prompt", pa.string()), ("corrupted_object", pa.string()),
    ("metric", pa.string()), ("clean_metric", pa.float32()), ("corrupted_metric", pa.float32()),
    ("completeness", pa.float32()), ("input_residual", pa.float32()), ("fractions", pa.list_(pa.float32())),
    ("edges", pa.list_(pa.int32())), ("circuit", pa.list_(pa.float32())),
    ("random", pa.list_(pa.list_(pa.float32()))),
])
CIRCUIT_SCHEMAS = {"edges": EDGES, "nodes": NODES, "faithfulness": FAITHFULNESS}
CIRCUIT_KINDS = ("prompts", *CIRCUIT_SCHEMAS)


def node_layer_head(name: str, layers: int) -> tuple[int, int]:
    """(layer, head) of a node name: input (-1, -1), a3.h5 (3, 5), m3 (3, -1), logits (layers, -1)."""
    if name == "input":
        return -1, -1
    if name == "logits":
        return layers, -1
    if name.startswith("m"):
        return int(name[1:]), -1
    layer, head = name[1:].split(".h")
    return int(layer), int(head)


def circuit_tables(specs: Sequence[PromptSpec], results: Sequence, graph, top_edges: int) -> dict[str, pa.Table]:
    """{kind: table} for one shard; results[i] is (EdgeAttribution, partner, curve) or None."""
    from kn_ray.engine.circuits import top_edge_indices

    ok = [(spec, r) for spec, r in zip(specs, results) if r is not None and r[0].ok]
    edges, nodes, faith = [], [], []
    layer_head = [node_layer_head(n, graph.layers) for n in graph.senders]
    receiver_index = {n: i for i, n in enumerate(graph.receivers)}
    for spec, (res, partner, curve) in ok:
        keys = dict(prompt_id=spec.prompt_id, fact_id=spec.fact_id, relation=spec.relation)
        flat = top_edge_indices(res.scores, graph, top_edges)
        for rank, (name, score) in enumerate(zip(graph.edge_names(flat), res.scores.flat[flat].tolist())):
            sender, receiver = name.split("->")
            edges.append(dict(keys, rank=rank, sender=sender, receiver=receiver, score=score))
        out, into = res.scores.sum(1), res.scores.sum(0)
        for i, name in enumerate(graph.senders + ["logits"]):
            layer, head = layer_head[i] if i < len(layer_head) else (graph.layers, -1)
            j = receiver_index.get(name)
            nodes.append(dict(keys, node=name, layer=layer, head=head,
                              score_out=float(out[i]) if i < len(out) else None,
                              score_in=None if j is None else float(into[j])))
        faith.append(dict(keys, corrupted_prompt_id=partner[0], corrupted_prompt=partner[1], corrupted_object=partner[2],
                          metric=res.metric, clean_metric=res.clean_metric, corrupted_metric=res.corrupted_metric,
                          completeness=res.completeness, input_residual=res.input_residual,
                          **_curve(curve)))
    return {"prompts": prompt_table(specs, [None if r is None else _prompt_view(r[0]) for r in results]),
            "edges": pa.Table.from_pylist(edges, schema=EDGES),
            "nodes": pa.Table.from_pylist(nodes, schema=NODES),
            "faithfulness": pa.Table.from_pylist(faith, schema=FAITHFULNESS)}


def _prompt_view(res):
    """An EdgeAttribution as the `prompts` table reads an attribution: completeness and
    evaluations as one-element lists, no top token."""
    return SimpleNamespace(status=res.status, reason=res.reason, ok=res.ok, gold_prob=res.gold_prob, top_token=None,
                           top_prob=None, seconds=res.seconds, max_score=res.max_score if res.ok else None,
                           completeness=np.array([res.completeness]), evaluations=np.array([res.evaluations]))


def _curve(curve) -> dict:
    if curve is None:
        return dict(fractions=None, edges=None, circuit=None, random=None)
    return dict(fractions=curve.fractions.astype(np.float32).tolist(), edges=curve.edges.astype(np.int32).tolist(),
                circuit=curve.circuit.astype(np.float32).tolist(), random=curve.random.astype(np.float32).tolist())
