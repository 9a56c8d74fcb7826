"""`kn-ray edit OUT`: the knowledge-neuron experiments (suppress, amplify, update, erase).

Reads the prompts and the aggregated neurons of OUT, cuts them into work units, runs the units
locally or on Ray actors, and writes `OUT/edits/part-<op>-NNNNN.parquet` plus
`OUT/edits/summary.json`. Re-running an op replaces that op's parts only: new parts are
written to a hidden staging folder and moved in once every unit has finished.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import pyarrow.parquet as pq

from kn_ray.stages.duck import connect, read_parquet
from kn_ray.stages.edit.corpus import OPS, EditCorpus, EditSettings, WorkUnit
from kn_ray.stages.edit.runner import ModelSpec
from kn_ray.stages.edit.tables import as_table, metric_summary, scale_summary, summary_dict, summary_text
from kn_ray.stages.rundir import RunDir, write_json_atomic

SUMMARY = "summary.json"
# where run.json may name the model and how it was loaded; first match wins
RUN_KEYS = {
    "name": (("identity", "model"), ("options", "model"), ("model", "name"), ("model",), ("model_name",)),
    "revision": (("options", "revision"), ("model", "revision"), ("revision",)),
    "precision": (("identity", "model_info", "precision"), ("options", "precision"), ("precision",)),
    "allow_pickle": (("options", "allow_pickle"),),
    "trust_remote_code": (("options", "trust_remote_code"),),
}


@dataclass(frozen=True)
class EditOptions:
    ops: tuple[str, ...] = OPS
    settings: EditSettings = field(default_factory=EditSettings)
    model: str | None = None  # None: the run's model (run.json)
    precision: str | None = None  # None: the run's precision, else auto
    batch_prompts: int = 32
    relations: tuple[str, ...] = ()
    fact_ids: tuple[str, ...] = ()
    unit_facts: int = 16
    workers: int = 1
    local: bool = False

    def check(self) -> "EditOptions":
        unknown = [op for op in self.ops if op not in OPS]
        if unknown or not self.ops:
            raise ValueError(f"--op must name some of {', '.join(OPS)}; got {', '.join(self.ops) or 'none'}")
        if self.workers < 1 or self.unit_facts < 1 or self.batch_prompts < 1:
            raise ValueError("workers, unit facts and batch prompts must be >= 1")
        self.settings.check()
        return self


def model_spec(run: RunDir, options: EditOptions) -> ModelSpec:
    """How to load the model: the options' model / precision, else what run.json recorded."""
    found = {key: _lookup(run.config, paths) for key, paths in RUN_KEYS.items()}
    name = options.model or found["name"]
    if not name:
        raise ValueError(f"{run.path / 'run.json'} names no model; pass --model")
    same_model = options.model is None or options.model == found["name"]
    return ModelSpec(str(name), revision=found["revision"] if same_model else None,
                     allow_pickle=bool(found["allow_pickle"]), trust_remote_code=bool(found["trust_remote_code"]),
                     precision=options.precision or found["precision"] or "auto", batch_prompts=options.batch_prompts)


def run_edits(out, options: EditOptions, *, progress: bool = True) -> dict:
    """Run the ops, write their parts and summary.json; returns the summary (with 'text')."""
    options.check()
    run = RunDir(out)
    corpus = EditCorpus(out, relations=options.relations, fact_ids=options.fact_ids)
    spec = model_spec(run, options)
    units = [unit for op in options.ops for unit in corpus.units(op, options.settings, options.unit_facts)]
    edits = run.table_dir("edits")
    staging = edits / f".staging-{uuid.uuid4().hex[:12]}"
    staging.mkdir(parents=True)
    try:
        for unit, rows in _progress(_execute(units, spec, options), len(units), progress):
            pq.write_table(as_table(rows), staging / _part_name(unit))
        _publish(staging, edits, options.ops)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return write_summary(run, options, spec, {op: sum(u.op == op for u in units) for op in options.ops})


def _execute(units: list[WorkUnit], spec: ModelSpec, options: EditOptions):
    """(unit, rows) for every unit: in this process, or on Ray actors when workers > 1."""
    if options.local or options.workers == 1:
        runner = spec.runner()
        return ((unit, runner.run(unit)) for unit in units)
    from kn_ray.stages.edit.actors import run_units

    return run_units(units, spec, options.workers)


def _part_name(unit: WorkUnit) -> str:
    return f"part-{unit.op}-{unit.index:05d}.parquet"


def _publish(staging: Path, edits: Path, ops) -> None:
    """Replace the parts of `ops` with the staged ones (a rename each, same filesystem)."""
    for op in ops:
        for old in edits.glob(f"part-{op}-*.parquet"):
            old.unlink()
    for part in sorted(staging.glob("part-*.parquet")):
        os.replace(part, edits / part.name)


def write_summary(run: RunDir, options: EditOptions, spec: ModelSpec, units: dict[str, int]) -> dict:
    """Summarise every part under OUT/edits (ops of earlier runs included) into summary.json."""
    edits = run.table_dir("edits")
    previous = _read_json(edits / SUMMARY).get("runs", {})
    now = datetime.now(timezone.utc).isoformat(timespec="seconds")
    runs = {**previous, **{op: dict(model=spec.name, revision=spec.revision, precision=spec.precision,
                                    settings=asdict(options.settings), relations=list(options.relations),
                                    fact_ids=list(options.fact_ids), units=units[op], created=now)
                           for op in options.ops}}
    with connect() as con:
        source = read_parquet(run.files("edits"), union_by_name=True)
        scale, metrics = scale_summary(con, source), metric_summary(con, source)
    summary = dict(runs=runs, results=summary_dict(scale, metrics))
    write_json_atomic(edits / SUMMARY, summary)
    return dict(summary, text=summary_text(scale, metrics))


def save_edit(out, options: EditOptions, directory) -> dict:
    """Apply one update (one fact) or erase (one relation) to the model and save it as a
    safetensors checkpoint in `directory`, with kn_ray_edit.json describing the edit."""
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
    spec = model_spec(RunDir(out), options)
    runner = spec.runner()
    edit = runner.apply(op, items[0], options.settings)
    directory = save_model(runner.lm, directory)
    edit = dict(edit, model=spec.name, revision=spec.revision)
    (directory / "kn_ray_edit.json").write_text(json.dumps(edit, indent=2) + "\n")
    return edit


def _progress(items, total: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(items, total=total, unit="unit", desc="editing", disable=not enabled, dynamic_ncols=True)


def _lookup(config: dict, paths):
    for path in paths:
        node = config
        for key in path:
            node = node.get(key) if isinstance(node, dict) else None
        if node is not None and not isinstance(node, dict):
            return node
    return None


def _read_json(file: Path) -> dict:
    try:
        data = json.loads(file.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}
