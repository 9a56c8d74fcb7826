"""What the model knows: the probe stage's rule, its table and the choice of facts to attribute.

A probe is one forward pass per prompt (no gradients): the gold object's probability, the rank
of its first token at the target position (`gold_rank`, 1 = the greedy prediction) and the
top prediction. A prompt is **known** under the run's rule (`--known`):

    top:K    gold_rank <= K   (default top:1: the model predicts the gold object's first token)
    prob:P   P(gold) >= P
    any      every prompt (the paper's behaviour)

A fact counts as known when at least `min_known_prompts` of its prompts are; `--max-facts-per-
relation N` then takes the first N known facts of each relation in input order (the order of
the facts file or files), probing the pool in growing windows (`probe_windows`) so that a small
N does not probe a whole corpus. Only known prompts of the chosen facts are attributed, unless
`--attribute-unknown`; the others stay in `prompts` as skipped rows with their probe fields.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

from kn_ray.fields import option

from .prompts import PromptSpec

DEFAULT_RULE = "top:1"
PROBE_SHARD = 128  # prompts per probe shard: a forward pass costs about 1/40 of an attribution
FIRST_WINDOW = 2  # x N facts per relation probed first; each later window doubles
NOT_KNOWN = "not known"  # the reason of a prompt left out because the model does not know it

PROBE = pa.schema([
    ("prompt_id", pa.string()), ("fact_id", pa.string()), ("relation", pa.string()), ("subject", pa.string()),
    ("object", pa.string()), ("template", pa.string()), ("prompt", pa.string()), ("target", pa.string()),
    ("status", pa.string()), ("error", pa.string()), ("gold_prob", pa.float32()), ("gold_rank", pa.int32()),
    ("top_token", pa.string()), ("top_prob", pa.float32()), ("known", pa.bool_()),
])
PROBE_KINDS = ("probe",)


@dataclass(frozen=True)
class KnownRule:
    """`top:K`, `prob:P` or `any`, parsed."""

    kind: str  # top | prob | any
    value: float = 0.0

    @classmethod
    def parse(cls, text: str) -> "KnownRule":
        name, _, arg = str(text).strip().partition(":")
        try:
            if name == "any" and not arg:
                return cls("any")
            if name == "top" and arg.isascii() and arg.isdigit() and int(arg) >= 1:
                return cls("top", int(arg))
            if name == "prob" and 0.0 <= float(arg) <= 1.0:
                return cls("prob", float(arg))
        except ValueError:
            pass
        raise ValueError(f"--known {text!r}: expected top:K (K >= 1), prob:P (0 <= P <= 1) or any")

    def __str__(self) -> str:
        return "any" if self.kind == "any" else f"top:{int(self.value)}" if self.kind == "top" else f"prob:{self.value!r}"

    def known(self, gold_rank: int | None, gold_prob: float | None) -> bool:
        if self.kind == "any":
            return True
        if self.kind == "top":
            return gold_rank is not None and 1 <= gold_rank <= self.value
        return gold_prob is not None and not math.isnan(gold_prob) and gold_prob >= self.value


@dataclass(frozen=True)
class ProbePolicy:
    """Which prompts and facts the run attributes, from what a forward pass shows the model knows."""

    known: str = option(DEFAULT_RULE, "a prompt is known if top:K (gold object's first token in the model's top K), "
                                      "prob:P (P(gold) >= P) or any (every prompt: the paper's behaviour)")
    min_known_prompts: int = option(1, "a fact is known with at least this many known prompts; "
                                       "--max-facts-per-relation counts known facts")
    attribute_unknown: bool = option(False, "attribute the prompts the model does not know too (to study them)")
    probe_only: bool = option(False, "probe only: write the probe table and its per-relation summary, attribute nothing")

    def check(self) -> None:
        self.rule  # raises on a bad rule
        if self.min_known_prompts < 1:
            raise ValueError(f"min_known_prompts must be >= 1, got {self.min_known_prompts}")

    @property
    def rule(self) -> KnownRule:
        return KnownRule.parse(self.known)

    def identity(self) -> dict:
        """What changes the attributed prompts (probe_only does not: a probe-only run resumes into a full one)."""
        return dict(known=str(self.rule), min_known_prompts=self.min_known_prompts,
                    attribute_unknown=self.attribute_unknown)


# ---- the probe table ---------------------------------------------------------------------------
def probe_table(specs: Sequence[PromptSpec], probes: Sequence, rule: KnownRule) -> pa.Table:
    """One row per spec; `probes[i]` is the engine's Probe for specs[i] (or None: decided before)."""
    rows = []
    for spec, probe in zip(specs, probes):
        row = {k: v for k, v in spec.as_dict().items() if k in PROBE.names}
        if probe is not None:
            row.update(status=probe.status, error=probe.reason)
            if probe.status == "ok":
                row.update(gold_prob=probe.gold_prob, gold_rank=probe.gold_rank, top_token=probe.top_token,
                           top_prob=probe.top_prob, known=rule.known(probe.gold_rank, probe.gold_prob))
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=PROBE)


# ---- choosing what to attribute ----------------------------------------------------------------
def probe_windows(fact_ids: dict[str, list[str]], limit: int | None,
                  first: int = FIRST_WINDOW) -> Iterator[dict[str, list[str]]]:
    """Per relation, the facts to probe next: every fact at once without a limit, else the first
    `first` x N facts (1 x N under `any`, where every fact counts), then windows twice as large,
    until the caller stops asking (enough known facts) or the relation runs out. Deterministic:
    input order only."""
    if limit is None:
        yield fact_ids
        return
    start, size = 0, first * limit
    while any(start < len(ids) for ids in fact_ids.values()):
        yield {rel: ids[start:start + size] for rel, ids in fact_ids.items() if start < len(ids)}
        start, size = start + size, size * 2


def known_facts(probe: pa.Table, min_known: int, rule: KnownRule) -> set[str]:
    """Facts with at least `min_known` known prompts in `probe`; under `any`, every probed
    prompt counts, even one the model cannot score (the paper's behaviour: every fact is used)."""
    if probe.num_rows == 0:
        return set()
    frame = probe.select(["fact_id", "known"]).to_pandas()
    mine = frame if rule.kind == "any" else frame[frame.known.fillna(False).astype(bool)]
    counts = mine.groupby("fact_id").size()
    return set(counts[counts >= min_known].index)


def choose_facts(fact_ids: dict[str, list[str]], known: set[str], limit: int | None) -> list[str]:
    """The first `limit` known facts of each relation, in input order."""
    chosen = []
    for ids in fact_ids.values():
        mine = [f for f in ids if f in known]
        chosen.extend(mine if limit is None else mine[:limit])
    return chosen


def with_probe(specs: Sequence[PromptSpec], probe: pa.Table, attribute_unknown: bool) -> list[PromptSpec]:
    """The specs carrying their probe fields; a prompt the model does not know becomes a skipped
    row (not attributed) unless `attribute_unknown`; a prompt the probe skipped keeps its reason."""
    found = {r["prompt_id"]: r for r in probe.select(["prompt_id", "status", "error", "gold_prob", "gold_rank",
                                                       "top_token", "top_prob", "known"]).to_pylist()}
    out = []
    for spec in specs:
        row = found.get(spec.prompt_id)
        if spec.status is not None or row is None:
            out.append(spec)
            continue
        fields = dict(gold_rank=row["gold_rank"], known=row["known"], gold_prob=row["gold_prob"],
                      top_token=row["top_token"], top_prob=row["top_prob"])
        if row["status"] != "ok":
            out.append(replace(spec, status=row["status"], error=row["error"], **fields))
        elif not row["known"] and not attribute_unknown:
            out.append(replace(spec, status="skipped", error=f"{NOT_KNOWN} (gold rank {row['gold_rank']})", **fields))
        else:
            out.append(replace(spec, **fields))
    return out


def relation_summary(probe: pa.Table, min_known: int, chosen: set[str] | None = None) -> list[dict]:
    """Per relation: prompts probed, known prompts and their share, median P(gold), facts probed,
    known facts (at least `min_known` known prompts) and, given `chosen`, the facts chosen."""
    frame = probe.select(["relation", "fact_id", "status", "gold_prob", "known"]).to_pandas()
    frame = frame[frame.status == "ok"]
    rows = []
    for relation, group in frame.groupby("relation", sort=True):
        known = group.known.fillna(False).astype(bool)
        per_fact = known.groupby(group.fact_id).sum()
        rows.append(dict(relation=relation, prompts=int(len(group)), known=int(known.sum()),
                         known_share=float(known.mean()) if len(group) else math.nan,
                         median_gold_prob=float(np.median(group.gold_prob)) if len(group) else math.nan,
                         facts=int(group.fact_id.nunique()),
                         known_facts=int((per_fact >= min_known).sum()),
                         **({} if chosen is None else dict(facts_chosen=len(set(group.fact_id) & chosen)))))
    return rows


def summary_lines(rows: list[dict]) -> list[str]:
    """The per-relation summary as aligned text."""
    head = f"{'relation':10s} {'prompts':>7s} {'known':>6s} {'share':>6s} {'median P':>9s} {'facts':>6s} {'known facts':>11s}"
    has_chosen = any("facts_chosen" in r for r in rows)
    lines = [head + (f" {'chosen':>6s}" if has_chosen else "")]
    for r in rows:
        line = (f"{r['relation']:10s} {r['prompts']:7d} {r['known']:6d} {r['known_share']:6.1%} "
                f"{r['median_gold_prob']:9.4f} {r['facts']:6d} {r['known_facts']:11d}")
        lines.append(line + (f" {r.get('facts_chosen', 0):6d}" if has_chosen else ""))
    return lines
