"""Corrupted inputs for circuits: the same template with another subject of the same relation.

EAP-IG compares each prompt with a corrupted one position by position, so the partner must
have as many tokens. The driver (no tokenizer) gives every prompt its candidates: the prompts
of the same relation and template whose fact has another object, ordered by
sha256(prompt_id, candidate prompt_id) (deterministic, independent of input order, spread over
candidates), at most `MAX_CANDIDATES`. The worker takes the first with as many tokens
(`choose_partner`) and records it. A prompt without a candidate is skipped with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

from .prompts import PromptSpec

MAX_CANDIDATES = 32
NO_PARTNER = "no other subject of this relation and template with another object"
NO_SAME_LENGTH = "no other subject of this relation and template has as many tokens and another object"


def _rank(a: str, b: str) -> str:
    return hashlib.sha256(f"{a}\x1f{b}".encode()).hexdigest()


def with_candidates(specs: list[PromptSpec]) -> list[PromptSpec]:
    """Specs to compute get `corrupt` = ((prompt_id, prompt, object), ...) of their candidates."""
    groups: dict[tuple, list[PromptSpec]] = {}
    for spec in specs:
        if spec.status is None and spec.template is not None:
            groups.setdefault((spec.relation, spec.template), []).append(spec)
    out = []
    for spec in specs:
        if spec.status is not None:
            out.append(spec)
        elif spec.template is None:
            out.append(replace(spec, status="skipped", error="circuits need a template to corrupt (ready prompts have none)"))
        else:
            others = [c for c in groups[(spec.relation, spec.template)] if c.fact_id != spec.fact_id and c.object != spec.object]
            others.sort(key=lambda c: _rank(spec.prompt_id, c.prompt_id))
            chosen = tuple((c.prompt_id, c.prompt, c.object) for c in others[:MAX_CANDIDATES])
            out.append(replace(spec, corrupt=chosen) if chosen else replace(spec, status="skipped", error=NO_PARTNER))
    return out


def choose_partner(spec: PromptSpec, length: Callable[[str], int]) -> tuple[str, str, str] | None:
    """The first candidate whose prompt has as many tokens as the spec's (None: none has)."""
    size = length(spec.prompt)
    return next((c for c in spec.corrupt if length(c[1]) == size), None)


def pair_corrupted(specs: list[PromptSpec], length: Callable[[str], int]) -> tuple[list[PromptSpec], dict[str, PromptSpec]]:
    """Both steps at once, where a tokenizer is at hand: (specs, {prompt_id: partner spec})."""
    by_id = {s.prompt_id: s for s in specs}
    out, partners = [], {}
    for spec in with_candidates(specs):
        chosen = choose_partner(spec, length) if spec.status is None else None
        if spec.status is None and chosen is None:
            spec = replace(spec, status="skipped", error=NO_SAME_LENGTH)
        elif chosen is not None:
            partners[spec.prompt_id] = by_id[chosen[0]]
        out.append(spec)
    return out, partners
