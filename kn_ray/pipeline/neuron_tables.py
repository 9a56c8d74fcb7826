"""Attribution results as Arrow tables: the Parquet contract (docs/output-schema.md).

Plain Arrow types only (string, float, int, list<float>): pandas, DuckDB and Spark read
them without extensions. Score arrays become neuron rows with numpy (`np.nonzero` over the
[layers, neurons] mask); Python loops run over prompts, never over neurons.

Two layouts of `neurons`: sparse (default), one row per kept (prompt, neuron); dense
(`--dense`), one row per (prompt, layer) holding the whole layer's scores as a fixed-size
list (float32, or float16 if asked): the [layers, neurons] array itself, no key per neuron.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from .options import KeepPolicy
from .prompts import PromptSpec

PROMPTS = pa.schema([
    ("prompt_id", pa.string()), ("fact_id", pa.string()), ("relation", pa.string()), ("subject", pa.string()),
    ("object", pa.string()), ("template", pa.string()), ("prompt", pa.string()), ("target", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("gold_prob", pa.float32()), ("top_token", pa.string()),
    ("top_prob", pa.float32()), ("gold_rank", pa.int32()), ("known", pa.bool_()), ("max_score", pa.float32()),
    ("completeness", pa.list_(pa.float32())), ("seconds", pa.float32()), ("evaluations", pa.list_(pa.int32())),
    ("score_error", pa.list_(pa.float32())),
    ("p_clean", pa.float32()), ("p_corrupted", pa.float32()),  # --mode trace (trace_tables); null otherwise
])
_NEURON_KEYS = [("prompt_id", pa.string()), ("fact_id", pa.string()), ("relation", pa.string()),
                ("layer", pa.int16()), ("neuron", pa.int32())]
NEURONS = pa.schema(_NEURON_KEYS + [("score", pa.float32())])
_LAYER_KEYS = _NEURON_KEYS[:4]
DENSE_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
ACTIVATIONS = pa.schema(_NEURON_KEYS + [("activation", pa.float32())])
SCHEMAS = {"prompts": PROMPTS, "neurons": NEURONS, "activations": ACTIVATIONS}
KINDS = tuple(SCHEMAS)


def dense_schema(num_neurons: int, dtype: str = "float32") -> pa.Schema:
    """`neurons` in the dense layout: one row per (prompt, layer), `scores[neuron]`."""
    return pa.schema(_LAYER_KEYS + [("scores", pa.list_(DENSE_DTYPES[dtype], num_neurons))])


def shard_tables(specs: Sequence[PromptSpec], results: Sequence, keep: KeepPolicy,
                 num_neurons: int | None = None) -> dict[str, pa.Table]:
    """{kind: table} for one shard; `results[i]` is the engine's Attribution for specs[i], or None
    for a row decided before the model ran. `num_neurons` (per layer) shapes an empty dense table."""
    ok = [(spec, res) for spec, res in zip(specs, results) if res is not None and res.ok and res.scores is not None]
    neurons = dense_table(ok, keep.dense_dtype, num_neurons) if keep.dense else \
        neuron_table(ok, "scores", "score", keep.ratio, False)
    return {
        "prompts": prompt_table(specs, results),
        "neurons": neurons,
        "activations": neuron_table(ok, "activations", "activation", keep.activation_ratio, False),
    }


def dense_table(ok: Sequence[tuple[PromptSpec, object]], dtype: str, num_neurons: int | None) -> pa.Table:
    """One row per (prompt, layer): the layer's scores as one fixed-size list (no copy per neuron)."""
    if ok:
        num_neurons = ok[0][1].scores.shape[1]
    schema = dense_schema(num_neurons or 0, dtype)
    if not ok:
        return schema.empty_table()
    np_dtype = np.float16 if dtype == "float16" else np.float32
    values = np.concatenate([res.scores.astype(np_dtype, copy=False).reshape(-1) for _, res in ok])
    counts = [res.scores.shape[0] for _, res in ok]
    keys = {name: np.repeat(np.array([getattr(spec, name) for spec, _ in ok], dtype=object), counts)
            for name in ("prompt_id", "fact_id", "relation")}
    layer = np.concatenate([np.asarray(res.layers, dtype=np.int16) for _, res in ok])
    scores = pa.FixedSizeListArray.from_arrays(pa.array(values, type=DENSE_DTYPES[dtype]), num_neurons)
    return pa.table({**keys, "layer": layer, "scores": scores}, schema=schema)


def sparse_rows(table: pa.Table) -> pa.Table:
    """Dense `neurons` rows as sparse ones (every neuron a row; float32 scores); sparse unchanged."""
    if "scores" not in table.column_names:
        return table
    width = table.schema.field("scores").type.list_size
    repeat = np.repeat(np.arange(table.num_rows), width)
    keys = {name: table.column(name).take(pa.array(repeat)) for name in table.column_names if name != "scores"}
    neuron = np.tile(np.arange(width, dtype=np.int32), table.num_rows)
    score = table.column("scores").combine_chunks().flatten().cast(pa.float32())
    return pa.table({**keys, "neuron": neuron, "score": score})


def prompt_table(specs: Sequence[PromptSpec], results: Sequence) -> pa.Table:
    rows = [_prompt_row(spec, res) for spec, res in zip(specs, results)]
    return pa.Table.from_pylist(rows, schema=PROMPTS)


def _prompt_row(spec: PromptSpec, res) -> dict:
    row = spec.as_dict()
    if res is None:
        return row
    row.update(status=res.status, error=res.reason)
    if res.ok:
        row.update(gold_prob=res.gold_prob, top_token=res.top_token, top_prob=res.top_prob, seconds=res.seconds,
                   max_score=res.max_score,
                   completeness=None if res.completeness is None else res.completeness.astype(np.float32).tolist(),
                   evaluations=None if res.evaluations is None else res.evaluations.astype(np.int32).tolist(),
                   p_clean=getattr(res, "p_clean", None), p_corrupted=getattr(res, "p_corrupted", None))
        error = getattr(res, "score_error", None)  # circuits' and traces' prompt rows have none
        row.update(score_error=None if error is None else error.astype(np.float32).tolist())
    return row


def kept(values: np.ndarray, ratio: float, dense: bool) -> tuple[np.ndarray, np.ndarray]:
    """(layer rows, neuron columns) of the kept entries of a [layers, neurons] array."""
    if dense:
        return np.nonzero(np.ones_like(values, dtype=bool))
    top = values.max() if values.size else 0.0
    return np.nonzero((values >= ratio * top) & (values > 0))


def neuron_table(ok: Sequence[tuple[PromptSpec, object]], attr: str, column: str, ratio: float, dense: bool) -> pa.Table:
    parts, counts = [], []
    for _, res in ok:
        values = getattr(res, attr)
        rows, cols = kept(values, ratio, dense)
        parts.append((np.asarray(res.layers, dtype=np.int16)[rows], cols.astype(np.int32), values[rows, cols].astype(np.float32)))
        counts.append(len(rows))
    schema = NEURONS if column == "score" else ACTIVATIONS
    if not parts:
        return schema.empty_table()
    layer, neuron, value = (np.concatenate(p) for p in zip(*parts))
    keys = {name: np.repeat(np.array([getattr(spec, name) for spec, _ in ok], dtype=object), counts)
            for name in ("prompt_id", "fact_id", "relation")}
    return pa.table({**keys, "layer": layer, "neuron": neuron, column: value}, schema=schema)
