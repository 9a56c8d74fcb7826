"""`kn-ray edit OUT`: the knowledge-neuron experiments (suppress, amplify, update, erase).

Reads the prompts and the aggregated neurons of OUT, cuts them into work units, runs the units
locally or on Ray actors, and writes the `edits` table, one group of parts per op
(`layout.part_file`), and its summary (OUT: a path or URI). Re-running an op replaces that op's parts only:
new parts are staged locally and published into OUT once every unit has finished.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from datetime import datetime, timezone

import pyarrow.parquet as pq

from kn_ray.pipeline import ray_env
from kn_ray.pipeline.layout import group_prefix, part_file
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.stages.duck import connect, source
from kn_ray.stages.edit.corpus import EditCorpus, WorkUnit
from kn_ray.stages.edit.options import EditOptions
from kn_ray.placement import Placement
from kn_ray.stages.edit.experiments import EditRunner
from kn_ray.stages.edit.nothing import nothing_to_edit, notes_text
from kn_ray.stages.edit.criteria import MIN_UNITS, criteria_summary, criteria_text
from kn_ray.stages.edit.outcomes import (EDITS, as_table, json_number, metric_summary, scale_summary, summary_dict,
                                       summary_text)

def placement_for(run: RunDirectory, options: EditOptions) -> Placement:
    """How to load the model: what run.json recorded (the resolved precision and dtype), with the
    placement options given to `kn-ray edit` on top."""
    try:
        return run.config.placement(**options.placement)
    except ValueError as error:
        raise ValueError(f"{error} (the placement of {run.location('run.json')} and the flags given)") from None


def run_edits(out, options: EditOptions, *, progress: bool = True) -> dict:
    """Run the ops, write their parts and the summary; returns the summary (with 'text')."""
    options.check()
    run = RunDirectory(out).require()
    corpus = EditCorpus(out, relations=options.relations, fact_ids=options.fact_ids)
    placement = placement_for(run, options)
    per_op = {op: corpus.units(op, options.settings, options.unit_facts) for op in options.ops}
    notes = {op: nothing_to_edit(corpus, op, options.settings) for op, found in per_op.items() if not found}
    units = [unit for op in options.ops for unit in per_op[op]]
    replaced = tuple(group_prefix(op) for op in options.ops)
    with run.staged("edits", replace=lambda name: name.startswith(replaced)) as staging:
        for op in notes:  # an op with nothing to edit: an empty part (its earlier parts are replaced)
            pq.write_table(EDITS.empty_table(), staging / part_file(0, op))
        for unit, rows in _progress(_execute(units, placement, options), len(units), progress):
            pq.write_table(as_table(rows), staging / part_file(unit.index, unit.op))
    return write_summary(run, options, placement, {op: len(found) for op, found in per_op.items()}, notes)


def _execute(units: list[WorkUnit], placement: Placement, options: EditOptions):
    """(unit, rows) for every unit: in this process, or on Ray actors (`--workers N`, or one on
    the cluster at $RAY_ADDRESS: a driver on a cluster's head node may have no GPU)."""
    if not units:
        return iter(())
    if options.local or (options.workers is None and not os.environ.get("RAY_ADDRESS")):
        runner = EditRunner.load(placement)
        return ((unit, runner.run(unit)) for unit in units)
    ray_env.prepare()  # before the actors' module imports Ray
    from kn_ray.stages.edit.actors import run_units

    return run_units(units, placement, options.workers or 1)


def write_summary(run: RunDirectory, options: EditOptions, placement: Placement, units: dict[str, int],
                  notes: dict[str, str] | None = None) -> dict:
    """Summarise every part under OUT/edits (ops of earlier runs included) into the edit summary;
    `notes`: why an op had nothing to edit."""
    notes = notes or {}
    try:
        previous = (run.summary("edit") or {}).get("runs", {})
    except ValueError:  # a damaged summary is rebuilt
        previous = {}
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = {**previous, **{op: dict(placement.as_dict(),  # how the model was loaded: model, revision, precision, ...
                                    settings=asdict(options.settings), relations=list(options.relations),
                                    fact_ids=list(options.fact_ids), units=units[op], created=now,
                                    **({"note": notes[op]} if op in notes else {}))
                           for op in options.ops}}
    with connect() as con:
        edits = source(con, run, "edits", union_by_name=True)
        scale, metrics = scale_summary(con, edits), metric_summary(con, edits)
        per_edit = con.execute(f"SELECT op, condition, metric, value FROM {edits} WHERE metric IS NOT NULL").df()
    criteria = criteria_summary(per_edit, seed=options.settings.seed)
    summary = dict(runs=runs, results=summary_dict(scale, metrics),
                   criteria=[{k: bool(v) if k == "too_few" else json_number(v) if isinstance(v, float) else v
                              for k, v in r.items()} for r in criteria.to_dict("records")],
                   intervals=dict(method="percentile bootstrap over edits", level=0.95, resamples=2000,
                                  min_units=MIN_UNITS))
    run.write_summary("edit", summary)
    text = "\n\n".join(t for t in (notes_text(notes), summary_text(scale, metrics), criteria_text(criteria)) if t)
    if notes and not any(units.values()):
        text = "\n\n".join([notes_text(notes), f"Nothing was edited: {run.location('edits')} holds an empty part for "
                             f"{', '.join(notes)}, and {run.summary_location('edit')} says why."])
    return dict(summary, text=text)


def save_edit(out, options: EditOptions, directory) -> dict:
    """Apply one update (one fact) or erase (one relation) to the model and save it as a
    safetensors checkpoint in `directory` (a path or URI; what it held is replaced), with
    kn_ray_edit.json describing the edit."""
    from kn_ray.engine.editing import save_model

    options.check()
    if len(options.ops) != 1 or options.ops[0] not in ("update", "erase"):
        raise ValueError("--save needs exactly one --op: update (with --fact-id) or erase (with --relation)")
    op = options.ops[0]
    corpus = EditCorpus(out, relations=options.relations, fact_ids=options.fact_ids)
    items = [item for unit in corpus.units(op, options.settings) for item in unit.items]
    if len(items) != 1:
        what = "fact (--fact-id)" if op == "update" else "relation (--relation)"
        raise ValueError(f"--save edits exactly one {what}; the selection gives {len(items)} {op} edits")
    placement = placement_for(RunDirectory(out).require(), options)
    runner = EditRunner.load(placement)
    edit = runner.apply(op, items[0], options.settings)
    edit = dict(edit, model=placement.model, revision=placement.revision)
    target = os.fspath(directory).rstrip("/")
    with RunDirectory(os.path.dirname(target) or ".").staged(os.path.basename(target)) as local:
        save_model(runner.lm, local)
        (local / "kn_ray_edit.json").write_text(json.dumps(edit, indent=2) + "\n")
    return edit


def _progress(items, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, unit="unit", desc="editing", disable=not enabled, dynamic_ncols=True)
