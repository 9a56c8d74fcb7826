"""The consumer contract of docs/output-schema.md: every table folder of a finished run (each
command of the catalogue run once on a tiny random model) opens as one table, folder as given,
in pandas, pyarrow.dataset, DuckDB and Polars, with the row count kn-ray recorded, in both
neuron layouts. The tables come from the run directory's catalogue (`layout.TABLES`), so a
table added later joins this test once its command is in `STAGES`."""

from __future__ import annotations

import os
from dataclasses import replace

import pandas as pd
import pytest

from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.options import KeepPolicy
from kn_ray.pipeline.layout import CIRCUITS, CIRCUITS_AGGREGATE, MARKERS, REPORT, RUN_FILE, SUMMARIES, TABLES, TRACE
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.aggregate import AggregateParams, aggregate
from kn_ray.stages.edit.options import EditOptions, EditSettings
from kn_ray.stages.edit.stage import run_edits
from tests.readers import assert_every_reader_counts
from tests.test_s3 import options, world  # noqa: F401  (the tiny JSONL world and its model)

EDIT = EditOptions(settings=EditSettings(max_facts=1, control_prompts=2, ppl_facts=1, erase_top=2,
                                         erase_other_prompts=2), local=True)
EDIT_OPS = {"sparse": EDIT.ops, "dense": ("suppress",)}  # the edits table does not depend on the layout
STAGES = {  # command -> how this test runs it on OUT (attribute: `layout` is sparse or dense)
    "attribute": lambda world, out, layout: run_pipeline(
        replace(options(world, str(out)), keep=KeepPolicy(dense=layout == "dense")), progress=False).ok,
    "aggregate": lambda world, out, layout: aggregate(out, AggregateParams(p=0.3, min_prompts=1)),
    "edit": lambda world, out, layout: run_edits(out, replace(EDIT, ops=EDIT_OPS[layout]), progress=False),
}


# a circuits or trace run writes these instead of neurons/activations: test_circuits_pipeline and
# test_trace_pipeline read them the same ways
NEURON_RUN = {table: stage for table, stage in TABLES.items() if stage not in (CIRCUITS, CIRCUITS_AGGREGATE, TRACE)}


def test_every_catalogued_table_is_written_by_a_stage_this_test_runs():
    unknown = {table: stage for table, stage in NEURON_RUN.items() if stage not in STAGES}
    assert not unknown, f"add the commands writing {unknown} to STAGES, so their tables join the contract test"


@pytest.fixture(scope="module", params=["sparse", "dense"])
def finished(request, world, ray_local, tmp_path_factory):  # noqa: F811
    out = tmp_path_factory.mktemp(request.param) / "out"
    for run_stage in STAGES.values():
        assert run_stage(world, out, request.param)
    return RunDirectory(out)


def recorded_rows(run: RunDirectory, table: str) -> int:
    """What kn-ray recorded: the shard markers' counts (attribute), else aggregate.json's (aggregate)
    or kn-ray's own reader (the rest)."""
    if TABLES[table] == "attribute":
        return sum(marker["rows"].get(table, 0) for marker in run.markers().values())
    if table in ("knowledge_neurons", "relation_neurons"):
        counts = run.summary("aggregate")["counts"]
        return sum(counts[method][table] for method in ("ig", "activation"))
    return run.dataset(table).count_rows()


def test_each_table_folder_opens_in_every_reader_with_the_recorded_rows(finished):
    assert finished.tables() == list(NEURON_RUN)
    for table in NEURON_RUN:
        folder = finished.path(table)
        expected = recorded_rows(finished, table)
        assert expected > 0, table
        assert_every_reader_counts(folder, expected)


def test_table_folders_hold_parquet_parts_only_and_everything_else_is_catalogued(finished):
    for table in NEURON_RUN:
        names = os.listdir(finished.path(table))
        assert names and all(n.startswith("part-") and n.endswith(".parquet") for n in names), (table, names)
    known = set(TABLES) | set(SUMMARIES.values()) | {RUN_FILE, MARKERS, REPORT}
    present = {n for n in os.listdir(finished.root) if not n.startswith((".", "_")) or n == MARKERS}
    assert present <= known and set(SUMMARIES.values()) <= present


def test_the_edits_folder_reads_as_the_edit_rows(finished):
    edits = pd.read_parquet(finished.path("edits"))
    layout = "dense" if finished.config.dense else "sparse"
    assert set(edits.op) == set(EDIT_OPS[layout]) and edits.columns[0] == "op"
    assert finished.summary("edit")["runs"].keys() == set(EDIT_OPS[layout])
