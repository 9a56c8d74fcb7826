"""The catalogue of the run directory: every file and folder name of OUT, spelled here only
(docs/output-schema.md). Pure names, no I/O; `rundir.RunDirectory` reads and writes them.

    OUT/run.json                                   RunRecord, written once
    OUT/{prompts,neurons,activations}/part-NNNNN-ATTEMPT.parquet   a shard's parts, per attempt
    OUT/{edges,nodes,faithfulness}/part-NNNNN-ATTEMPT.parquet   --mode circuits, instead of neurons/activations
    OUT/traces/part-NNNNN-ATTEMPT.parquet          --mode trace, instead of neurons/activations
    OUT/probe/part-probe-NNNNN-ATTEMPT.parquet     the probe stage's shards (what the model knows)
    OUT/_shards/part-NNNNN.json                    done marker: names the committed attempt's parts
    OUT/{knowledge_neurons,relation_neurons,shared_neurons,fact_consistency}/part-NNNNN.parquet   aggregate
    OUT/edits/part-OP-NNNNN.parquet                edit, one group of parts per op
    OUT/probe.json, OUT/aggregate.json, OUT/edits.json   stages' summaries, beside their tables
    OUT/report/                                    the HTML report and its figures

Every table folder holds Parquet parts and nothing else, so any dataset reader (pandas,
pyarrow, DuckDB, Polars, Spark) opens it as one table.
"""

from __future__ import annotations

import os

from .circuit_tables import CIRCUIT_KINDS
from .known import PROBE_KINDS
from .neuron_tables import KINDS
from .trace_tables import TRACE_KINDS

RUN_FILE = "run.json"
MARKERS = "_shards"
REPORT = "report"  # HTML and PNG files: a folder, not a table
PART = "part-"  # every part file and shard name starts with it
PARQUET = ".parquet"
MARKER_SUFFIX = ".json"

SHARD_KINDS = tuple(dict.fromkeys(PROBE_KINDS + KINDS + CIRCUIT_KINDS + TRACE_KINDS))  # tables committed shard by shard (any mode)
PROBE_GROUP = "probe"  # the probe stage's shards: part-probe-NNNNN
CIRCUITS = "attribute --mode circuits"
CIRCUITS_AGGREGATE = "aggregate (a circuits run)"
TRACE = "attribute --mode trace"

# every table folder of OUT, and the command that writes it
TABLES: dict[str, str] = {"probe": "attribute", **{kind: "attribute" for kind in KINDS}, **{kind: CIRCUITS for kind in CIRCUIT_KINDS[1:]},
                          **{kind: TRACE for kind in TRACE_KINDS[1:]},
                          "knowledge_neurons": "aggregate", "relation_neurons": "aggregate",
                          "shared_neurons": "aggregate", "shared_neuron_facts": "aggregate",
                          "fact_consistency": "aggregate",
                          "relation_circuits": CIRCUITS_AGGREGATE, "edits": "edit"}
SUMMARIES: dict[str, str] = {"probe": "probe.json", "aggregate": "aggregate.json", "edit": "edits.json"}


def shard_name(shard_id: int, group: str | None = None) -> str:
    """part-NNNNN (part-GROUP-NNNNN for the probe stage's shards): a shard's marker (`marker_file`)
    and the stem of its parts (`attempt_part`)."""
    return f"{group_prefix(group)}{shard_id:05d}"


def marker_file(shard: str) -> str:
    return f"{shard}{MARKER_SUFFIX}"


def marker_shard(path: str) -> str | None:
    """The shard a marker file names, or None for any other file."""
    name = os.path.basename(path)
    return name.removesuffix(MARKER_SUFFIX) if name.startswith(PART) and name.endswith(MARKER_SUFFIX) else None


def attempt_part(kind: str, shard: str, attempt: str) -> str:
    """One attempt's part of an attribute table, relative to OUT."""
    return f"{kind}/{shard}-{attempt}{PARQUET}"


def group_prefix(group: str | None = None) -> str:
    """What the part files of one group (an edit op) start with; of all parts without a group."""
    return f"{PART}{group}-" if group else PART


def part_file(index: int, group: str | None = None) -> str:
    """part-NNNNN.parquet, or part-GROUP-NNNNN.parquet: a later stage's part (edit: per op)."""
    return f"{group_prefix(group)}{index:05d}{PARQUET}"


def is_part(path: str) -> bool:
    """A Parquet part (not a temporary or foreign file) by its name."""
    name = os.path.basename(path)
    return name.startswith(PART) and name.endswith(PARQUET)
