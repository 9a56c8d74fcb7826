"""Computing one shard: the work of a Ray actor, kept free of Ray so it runs anywhere.

The model is loaded once per worker and reused for every shard; rows decided before the
model runs (bad records) pass through untouched, the rest go to the engine in one call,
which turns an unusable or failing prompt into a skipped/error result instead of raising.
Given a `ShardOutput`, the worker writes the shard's parts itself and returns only their
names, row counts and sizes; the driver checks them and commits (`commit`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from kn_ray.placement import Placement

from . import faults
from .circuit_tables import circuit_tables
from .corrupt import choose_partner, partner_target
from .options import KeepPolicy
from .prompts import PromptSpec
from .commit import Commits, Part
from .storage import cached_storage
from .neuron_tables import shard_tables


@dataclass(frozen=True)
class ShardOutput:
    """Where one attempt writes: the run directory's URI, the shard, the attempt id, file metadata."""

    uri: str
    shard: str
    attempt: str
    metadata: dict

    def write(self, tables: dict[str, pa.Table]) -> dict[str, Part]:
        """Write the attempt's parts (no marker: the driver commits)."""
        return Commits(cached_storage(self.uri)).write_parts(self.shard, self.attempt, tables, self.metadata)


@dataclass(frozen=True)
class ShardResult:
    """What an attempt at a shard returns: the parts it wrote (given a ShardOutput), else its
    tables, for the driver to write."""

    parts: dict[str, Part] | None = None
    tables: dict[str, pa.Table] | None = None


class ShardComputer:
    def __init__(self, placement: Placement, threads: int | None = None):
        from kn_ray.engine import Attributor
        from kn_ray.engine.precision import dtype_name

        placement = placement.for_actor(threads)
        lm = placement.load()
        self.lm = lm
        self.dtype = dtype_name(lm.dtype)  # the weights, as loaded: fp32 | bf16 | fp16
        self.attributor = Attributor(lm, precision=placement.precision, max_batch_prompts=placement.batch_cap)
        self.asked_precision = placement.precision  # circuits read `auto` their own way (fp32 on fp32 weights)
        self.edges = None  # EdgeAttributor, made on the first circuits shard
        self.prober = None  # Prober, made on the first probe shard
        self.tracer = None  # Tracer, made on the first trace shard

    def info(self) -> dict:
        """What the run records about the model, as this worker loaded it."""
        lm = self.lm
        return dict(name=lm.name, source=lm.source, revision=lm.revision, masked=lm.adapter.masked,
                    num_layers=lm.num_layers, num_neurons=lm.num_neurons, precision=self.attributor.precision,
                    dtype=self.dtype, device=str(lm.device),
                    devices=[str(d) for d in lm.devices])

    def compute(self, shard_id: int, specs: list[PromptSpec], n_steps: int | str, rule: str, keep: KeepPolicy,
                output: ShardOutput | None = None, mode: str = "neurons", **engine) -> ShardResult:
        """The parts written to `output`, or the tables without one. `engine`: further
        `Attributor.attribute` keywords (RunOptions.engine_extra); `mode="circuits"`: EAP-IG
        edges instead (`circuits`); `mode="trace"`: causal traces (`trace`); `mode="probe"`: the probe stage's forward passes (`probe`)."""
        faults.before_task(f"probe-{shard_id}" if mode == "probe" else shard_id)
        if mode == "probe":
            tables = self.probe(specs, **engine)
        elif mode == "circuits":
            tables = self.circuits(specs, n_steps, rule, **engine)
        elif mode == "trace":
            tables = self.trace(specs, **engine)
        else:
            tables = self.neurons(specs, n_steps, rule, keep, **engine)
        result = ShardResult(tables=tables) if output is None else ShardResult(parts=output.write(tables))
        faults.after_task()
        return result

    def neurons(self, specs, n_steps, rule, keep: KeepPolicy, **engine) -> dict[str, pa.Table]:
        results = each_to_compute(specs, lambda todo: self.attributor.attribute(
            [s.prompt for s in todo], [s.target for s in todo], n_steps=n_steps, rule=rule, **engine))
        return shard_tables(specs, results, keep, self.lm.num_neurons)

    def probe(self, specs, *, known: str) -> dict[str, pa.Table]:
        """One forward pass per prompt: P(gold), the gold's rank, the top prediction, and whether
        the model knows it under the rule `known` (`known.py`)."""
        from kn_ray.engine.probe import Prober

        from .known import KnownRule, probe_table

        if self.prober is None:
            self.prober = Prober(self.lm, precision=self.attributor.precision,
                                 max_batch_prompts=self.attributor.max_batch_prompts)
        probes = each_to_compute(specs, lambda todo: self.prober.probe([s.prompt for s in todo], [s.target for s in todo]))
        return {"probe": probe_table(specs, probes, KnownRule.parse(known))}

    def trace(self, specs, *, samples: int, noise: float, window: int, kinds, seed: int) -> dict[str, pa.Table]:
        """Causal traces of every prompt to compute: its subject noised, each state restored."""
        from kn_ray.engine.tracing import Tracer

        from .trace_tables import trace_tables

        if self.tracer is None:
            self.tracer = Tracer(self.lm, precision=self.attributor.precision,
                                 max_batch_prompts=self.attributor.max_batch_prompts)
        results = each_to_compute(specs, lambda todo: self.tracer.trace(
            [s.prompt for s in todo], [s.target for s in todo], [s.subject for s in todo], samples=samples,
            noise=noise, window=window, kinds=kinds, seed=seed))
        return trace_tables(specs, results)

    def circuits(self, specs, n_steps, rule, *, metric: str, top_edges: int, faithfulness_random: int) -> dict[str, pa.Table]:
        """EAP-IG edges of every prompt against its corrupted partner (`corrupt`), and the
        faithfulness curve of its circuits."""
        from kn_ray.engine.circuits import EdgeAttribution, EdgeAttributor
        from kn_ray.engine.faithfulness import faithfulness_curve

        if self.edges is None:
            self.edges = EdgeAttributor(self.lm, precision=self.asked_precision,
                                        max_batch_prompts=self.attributor.max_batch_prompts)
        eap, tok = self.edges, self.lm.tokenizer
        results: list = [None] * len(specs)
        todo = []
        first = self._first_token if metric == "logit_diff" else None
        for i, spec in enumerate(specs):
            if spec.status is None:
                partner, reason = choose_partner(spec, lambda p: len(tok(p)["input_ids"]), first)
                if partner is None:
                    results[i] = (EdgeAttribution(spec.prompt, spec.target, "", status="skipped", reason=reason), None, None)
                else:
                    todo.append((i, partner, partner_target(spec, partner)))
        computed = eap.attribute_edges([specs[i].prompt for i, _, _ in todo], [specs[i].target for i, _, _ in todo],
                                       [p[1] for _, p, _ in todo], corrupted_targets=[t for _, _, t in todo],
                                       n_steps=n_steps, rule=rule, metric=metric) if todo else []
        for (i, partner, other), res in zip(todo, computed):
            curve = faithfulness_curve(eap, res, n_random=faithfulness_random, corrupted_target=other) \
                if res.ok and faithfulness_random else None
            results[i] = (res, partner, curve)
        return circuit_tables(specs, results, eap.graph, top_edges)

    def _first_token(self, prompt: str, target: str) -> int | None:
        """The first token of `target` after `prompt`, as the engine encodes it (None: unencodable)."""
        from kn_ray.engine.encoding import SkipPrompt

        try:
            return self.edges.encode(prompt, target).object_ids[0]
        except SkipPrompt:
            return None


def each_to_compute(specs, compute) -> list:
    """`compute(specs to compute)`'s results at their places among `specs`; None for the rows
    decided before the model runs (status set)."""
    todo = [i for i, spec in enumerate(specs) if spec.status is None]
    results: list = [None] * len(specs)
    if todo:
        for i, res in zip(todo, compute([specs[i] for i in todo])):
            results[i] = res
    return results
