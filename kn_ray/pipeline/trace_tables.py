"""Causal traces as Arrow tables (`--mode trace`; docs/output-schema.md, docs/tracing.md).

`traces`: one row per (prompt, kind, layer, prompt token): P(gold) with that state restored in
the noised run, the mean over samples; `token_role` places the token against the subject.
`prompts` carries p_clean and p_corrupted (gold_prob = p_clean).
"""

from __future__ import annotations

from collections.abc import Sequence
from types import SimpleNamespace

import numpy as np
import pyarrow as pa

from .neuron_tables import prompt_table
from .prompts import PromptSpec

_KEYS = [("prompt_id", pa.string()), ("fact_id", pa.string()), ("relation", pa.string())]
TRACES = pa.schema(_KEYS + [("kind", pa.string()), ("layer", pa.int16()), ("token", pa.int16()),
                            ("token_role", pa.string()), ("p_restored", pa.float32())])
TRACE_SCHEMAS = {"traces": TRACES}
TRACE_KINDS = ("prompts", *TRACE_SCHEMAS)


def trace_tables(specs: Sequence[PromptSpec], results: Sequence) -> dict[str, pa.Table]:
    """{kind: table} for one shard; results[i] is the engine's Trace for specs[i], or None for a
    row decided before the model ran."""
    columns: dict[str, list] = {name: [] for name in TRACES.names}
    for spec, res in zip(specs, results):
        if res is None or not res.ok:
            continue
        K, L, T = res.p_restored.shape
        n = K * L * T
        for name in ("prompt_id", "fact_id", "relation"):
            columns[name].append(np.full(n, getattr(spec, name), dtype=object))
        columns["kind"].append(np.repeat(np.array(res.kinds, dtype=object), L * T))
        columns["layer"].append(np.tile(np.repeat(np.arange(L, dtype=np.int16), T), K))
        columns["token"].append(np.tile(np.arange(T, dtype=np.int16), K * L))
        columns["token_role"].append(np.tile(np.array(res.roles, dtype=object), K * L))
        columns["p_restored"].append(res.p_restored.astype(np.float32).reshape(-1))
    if columns["kind"]:
        traces = pa.table({name: np.concatenate(parts) for name, parts in columns.items()}, schema=TRACES)
    else:
        traces = TRACES.empty_table()
    return {"prompts": prompt_table(specs, [None if r is None else _prompt_view(r) for r in results]),
            "traces": traces}


def _prompt_view(res):
    """A Trace as the `prompts` table reads an attribution: gold_prob is p_clean."""
    return SimpleNamespace(status=res.status, reason=res.reason, ok=res.ok, gold_prob=res.p_clean, top_token=None,
                           top_prob=None, seconds=res.seconds, max_score=None, completeness=None, evaluations=None,
                           p_clean=res.p_clean, p_corrupted=res.p_corrupted)
