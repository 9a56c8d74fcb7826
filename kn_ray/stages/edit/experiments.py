"""The edit experiments on one work unit: pure functions of (loaded model, unit) -> prompt rows.

* suppress / amplify scale neuron activations at the target position (factor 0 / 2) through
  Prober hooks: no weight changes, so every fact and condition of a unit goes in one batched
  probe call.
* update / erase change value slots, which needs one forward pass per edit; each edit runs
  inside `edited()`, which restores the exact original slots before the next.

Only the loaded model in memory is edited, never a checkpoint file.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
import numpy as np
import pandas as pd
import torch

from kn_ray.engine import LoadedModel, Prober, SkipPrompt
from kn_ray.engine.editing import add_to_value_slots, edited, set_value_slots, value_slot, word_embedding
from kn_ray.engine.probe import Probe
from kn_ray.placement import Placement
from kn_ray.stages.edit.outcomes import edit_metric_rows, prompt_row
from kn_ray.stages.edit.corpus import FactItem, Neurons, PromptRef, RelationItem, WorkUnit, retarget, rng_for

FACTORS = {"suppress": 0.0, "amplify": 2.0}


# ---- the edits themselves ----------------------------------------------------------------------
def random_neurons(neurons: Neurons, num_neurons: int, rng: np.random.Generator) -> Neurons:
    """As many random neurons per layer as `neurons` has there, none of them (a control with
    the same count and layer profile)."""
    out: Neurons = []
    for layer, count in sorted(Counter(layer for layer, _ in neurons).items()):
        pool = np.setdiff1d(np.arange(num_neurons), [n for l, n in neurons if l == layer])
        out += [(layer, int(n)) for n in np.sort(rng.choice(pool, size=min(count, len(pool)), replace=False))]
    return out


def update_delta(slots: torch.Tensor, e_old: torch.Tensor, e_new: torch.Tensor,
                 lambda1: float, lambda2: float) -> torch.Tensor:
    """What update adds to each value slot v ([k, hidden] -> [k, hidden]), as in the authors' code:
    delta = |v| (lambda2 e_new / |e_new| - lambda1 e_old / |e_old|), with |v| the slot's norm
    before the edit: each embedding is scaled to the slot's norm, then weighted."""
    unit_old = e_old.float() / e_old.float().norm().clamp_min(1e-12)
    unit_new = e_new.float() / e_new.float().norm().clamp_min(1e-12)
    return slots.float().norm(dim=1, keepdim=True) * (lambda2 * unit_new - lambda1 * unit_old)


def apply_update(lm: LoadedModel, slots: Neurons, old_id: int, new_id: int, lambda1: float, lambda2: float) -> None:
    """Move the slots from the old object's input embedding towards the new one's (token ids)."""
    current = torch.stack([value_slot(lm, layer, neuron).float() for layer, neuron in slots])
    e_old, e_new = word_embedding(lm, [old_id]), word_embedding(lm, [new_id])
    add_to_value_slots(lm, slots, update_delta(current, e_old.to(current.device), e_new.to(current.device),
                                               lambda1, lambda2))


def erase_value(lm: LoadedModel, mode: str) -> torch.Tensor | float:
    """0.0, or the unknown token's input embedding (`unk`)."""
    if mode == "zero":
        return 0.0
    unk = lm.tokenizer.unk_token_id
    if unk is None:
        raise ValueError(f"{lm.name}: the tokenizer has no unknown token; use --erase-value zero")
    return word_embedding(lm, [unk])


def apply_erase(lm: LoadedModel, slots: Neurons, value: torch.Tensor | float) -> None:
    set_value_slots(lm, slots, value)


# ---- the experiments ---------------------------------------------------------------------------
class EditRunner:
    """Runs work units on one loaded model (locally, or inside a Ray actor)."""

    def __init__(self, lm: LoadedModel, *, precision: str = "auto", batch_prompts: int | None = None):
        self.lm = lm
        self.prober = Prober(lm, precision=precision, max_batch_prompts=batch_prompts)  # None: sized to the device

    @classmethod
    def load(cls, placement: Placement) -> "EditRunner":
        """Load the model as `placement` says (in this process or a Ray actor)."""
        return cls(placement.load(), precision=placement.precision, batch_prompts=placement.batch_cap)

    def apply(self, op: str, item: FactItem | RelationItem, settings) -> dict:
        """Apply one item's 'kn' edit for good (for saving an edited model); returns what was done."""
        if op == "erase":
            apply_erase(self.lm, item.neurons, erase_value(self.lm, settings.erase_value))
            return dict(op=op, relation=item.relation, neurons=item.neurons, erase_value=settings.erase_value)
        if op != "update":
            raise ValueError(f"only update and erase edit weights; {op} scales activations")
        chosen = self._new_object(item)
        if chosen is None:
            raise ValueError(f"fact {item.fact_id}: no new object this tokenizer can tell apart from the old one")
        new_object, old_id, new_id = chosen
        apply_update(self.lm, item.kn, old_id, new_id, settings.lambda1, settings.lambda2)
        return dict(op=op, relation=item.relation, fact_id=item.fact_id, new_object=new_object,
                    old_token_id=old_id, new_token_id=new_id, neurons=item.kn,
                    lambda1=settings.lambda1, lambda2=settings.lambda2)

    def run(self, unit: WorkUnit) -> pd.DataFrame:
        """Prompt rows of the unit, followed by its per-edit metric rows (outcomes.edit_metric_rows:
        update / erase metrics, the criteria, destructive edits under the settings' bound)."""
        experiment = {"update": self.update, "erase": self.erase}.get(unit.op, self.scale)
        rows = pd.DataFrame.from_records(experiment(unit))
        if not len(rows):
            return rows
        metrics = edit_metric_rows(rows, unit.settings.destructive_ppl_ratio)
        return pd.concat([rows, metrics], ignore_index=True) if len(metrics) else rows

    def probe(self, refs: Sequence[PromptRef], targets: Sequence[str] | None = None, *,
              neurons=None, factor: float = 1.0) -> list[Probe]:
        targets = [r.target for r in refs] if targets is None else targets
        return self.prober.probe([r.prompt for r in refs], list(targets), neurons=neurons, factor=factor)

    def scale(self, unit: WorkUnit) -> list[dict]:
        """Suppress / amplify: per fact, its ig neurons on its prompts ('kn'), on other relations'
        prompts ('other_relation'), its activation neurons ('activation') and random neurons in the
        same layers ('random') on its prompts; all scaled at the target position by FACTORS[op].
        The criteria's scopes (edit.criteria): each condition also on other facts of the relation
        ('same_relation') and the reversed fact ('reverse'); the neurons found from half the
        fact's templates, and random ones like them, on the other half ('heldout')."""
        jobs = []  # (item, condition, scope, ref, neurons)
        for item in unit.items:
            rnd = random_neurons(item.kn, self.lm.num_neurons, rng_for(unit.settings.seed, item.fact_id, "random"))
            rnd_seen = random_neurons(item.seen_kn, self.lm.num_neurons,
                                      rng_for(unit.settings.seed, item.fact_id, "random_seen"))
            for condition, scope, neurons, refs in (("kn", "target", item.kn, item.prompts),
                                                    ("activation", "target", item.activation, item.prompts),
                                                    ("random", "target", rnd, item.prompts),
                                                    ("other_relation", "other_relation", item.kn, item.controls),
                                                    ("kn", "heldout", item.seen_kn, item.heldout),
                                                    ("random", "heldout", rnd_seen, item.heldout),
                                                    *((c, s, n, r) for c, n in (("kn", item.kn),
                                                                                ("activation", item.activation),
                                                                                ("random", rnd))
                                                      for s, r in (("same_relation", item.same_relation),
                                                                   ("reverse", item.reverse)))):
                jobs += [(item, condition, scope, ref, neurons) for ref in refs if neurons]
        if not jobs:
            return []
        unique = list({job[3].prompt_id: job[3] for job in jobs}.values())
        before = dict(zip((r.prompt_id for r in unique), self.probe(unique)))
        after = self.probe([job[3] for job in jobs], neurons=[job[4] for job in jobs], factor=FACTORS[unit.op])
        return [prompt_row(unit.op, item.relation, item.fact_id, condition, scope, len(neurons), ref.prompt_id,
                           before[ref.prompt_id], probe)
                for (item, condition, scope, ref, neurons), probe in zip(jobs, after)
                if before[ref.prompt_id].status == probe.status == "ok"]

    def update(self, unit: WorkUnit) -> list[dict]:
        """Update: per fact, shift its neurons' value slots from the old object's embedding to the
        new object's ('kn'), and the same for random neurons in the same layers ('random'); read
        the fact's prompts (old and new target) and other facts' prompts (perplexity)."""
        s, rows = unit.settings, []
        for item in unit.items:
            chosen = self._new_object(item)
            if chosen is None:
                continue
            new_object, old_id, new_id = chosen
            refs = item.prompts + item.same_relation + item.other_relation + item.reverse
            scopes = (["target"] * len(item.prompts) + ["same_relation"] * len(item.same_relation)
                      + ["other_relation"] * len(item.other_relation) + ["reverse"] * len(item.reverse))
            new_targets = [retarget(r.target, new_object) for r in item.prompts]
            pairs = refs + item.prompts, [r.target for r in refs] + new_targets
            before = self.probe(*pairs)
            rnd = random_neurons(item.kn, self.lm.num_neurons, rng_for(s.seed, item.fact_id, "random"))
            for condition, slots in (("kn", item.kn), ("random", rnd)):
                with edited(self.lm, slots):
                    apply_update(self.lm, slots, old_id, new_id, s.lambda1, s.lambda2)
                    after = self.probe(*pairs)
                rows += _update_rows(item, condition, len(slots), new_object, refs, scopes, before, after)
        return rows

    def _new_object(self, item: FactItem) -> tuple[str, int, int] | None:
        """(new object, old first token, new first token): the first candidate that encodes and
        whose first token differs from the old object's (else the edit could not be told apart)."""
        for ref in item.prompts:
            try:
                old_id = self.prober.encode(ref.prompt, ref.target).object_ids[0]
            except SkipPrompt:
                continue
            for candidate in item.new_objects:
                try:
                    new_id = self.prober.encode(ref.prompt, retarget(ref.target, candidate)).object_ids[0]
                except SkipPrompt:
                    continue
                if new_id != old_id:
                    return candidate, old_id, new_id
            return None
        return None

    def erase(self, unit: WorkUnit) -> list[dict]:
        """Erase: per relation, set its top relation neurons' value slots to zero / the unknown
        token's embedding ('kn'), and random neurons in the same layers ('random'); read the
        relation's prompts ('target') and other relations' prompts ('other_relation')."""
        s, rows = unit.settings, []
        value = erase_value(self.lm, s.erase_value)
        for item in unit.items:
            refs = item.prompts + item.other_relation
            scopes = ["target"] * len(item.prompts) + ["other_relation"] * len(item.other_relation)
            before = self.probe(refs)
            rnd = random_neurons(item.neurons, self.lm.num_neurons, rng_for(s.seed, item.relation, "random"))
            for condition, slots in (("kn", item.neurons), ("random", rnd)):
                with edited(self.lm, slots):
                    apply_erase(self.lm, slots, value)
                    after = self.probe(refs)
                rows += [prompt_row("erase", item.relation, None, condition, scope, len(slots), ref.prompt_id, b, a)
                         for ref, scope, b, a in zip(refs, scopes, before, after) if b.status == a.status == "ok"]
        return rows


def _update_rows(item: FactItem, condition: str, n_neurons: int, new_object: str, refs, scopes,
                 before: list[Probe], after: list[Probe]) -> list[dict]:
    """Rows of one update edit; the probes hold every ref, then the fact's prompts with the new target."""
    n, rows = len(refs), []
    for i, (ref, scope) in enumerate(zip(refs, scopes)):
        if not before[i].status == after[i].status == "ok":
            continue
        row = prompt_row("update", item.relation, item.fact_id, condition, scope, n_neurons, ref.prompt_id,
                         before[i], after[i])
        row["new_object"] = new_object
        if scope == "target":
            new_before, new_after = before[n + i], after[n + i]
            ok = new_before.status == new_after.status == "ok"
            row.update(new_prob_before=new_before.gold_prob if ok else None,
                       new_prob_after=new_after.gold_prob if ok else None,
                       new_top1_after=new_after.correct if ok else None)
        rows.append(row)
    return rows
