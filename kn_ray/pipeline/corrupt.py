"""Corrupted inputs for circuits: the same template with another subject of the same relation.

EAP-IG compares each prompt with a corrupted one position by position, so the partner must
have as many tokens. The driver (no tokenizer) gives every prompt its candidates: the prompts
of the same relation and template whose fact has another object, ordered by
sha256(prompt_id, candidate prompt_id) (deterministic, independent of input order, spread over
candidates), at most `MAX_CANDIDATES`. The worker takes the first with as many tokens
(`choose_partner`) and records it. A prompt without a candidate is skipped with the reason.

Under `--metric logit_diff` (logit of the gold's first token minus the partner object's first
token) the partner's object must also start with another token: " paris" against " paris
france" makes the metric exactly 0 and every edge 0. The worker passes `first_token` (the
first token of an object after a prompt, from the model's tokenizer) and the first candidate
passing both checks is taken; a prompt with none is skipped with `NO_OTHER_FIRST_TOKEN`.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

from .prompts import PromptSpec

MAX_CANDIDATES = 32
NO_PARTNER = "no other subject of this relation and template with another object"
NO_SAME_LENGTH = "no other subject of this relation and template has as many tokens and another object"
NO_OTHER_FIRST_TOKEN = ("no other subject of this relation and template has as many tokens and an object whose first "
                        "token differs from the gold's (logit_diff would be 0)")

Candidate = tuple[str, str, str]  # (prompt_id, prompt, object)


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


def partner_target(spec: PromptSpec, candidate: Candidate) -> str:
    """The candidate's object as a target of `spec`'s prompt (the same leading space)."""
    return spec.target[: len(spec.target) - len(spec.target.lstrip())] + candidate[2]


def choose_partner(spec: PromptSpec, length: Callable[[str], int],
                   first_token: Callable[[str, str], int | None] | None = None) -> tuple[Candidate | None, str | None]:
    """(the first candidate whose prompt has as many tokens as the spec's and, given
    `first_token(prompt, target)`, whose object starts with another token than the gold, None)
    or (None, the reason none does)."""
    size = length(spec.prompt)
    same = [c for c in spec.corrupt if length(c[1]) == size]
    if not same:
        return None, NO_SAME_LENGTH
    if first_token is None:
        return same[0], None
    gold = first_token(spec.prompt, spec.target)
    for c in same:
        other = first_token(c[1], partner_target(spec, c))
        if other is not None and other != gold:
            return c, None
    return None, NO_OTHER_FIRST_TOKEN


def pair_corrupted(specs: list[PromptSpec], length: Callable[[str], int],
                   first_token: Callable[[str, str], int | None] | None = None
                   ) -> tuple[list[PromptSpec], dict[str, PromptSpec]]:
    """Both steps at once, where a tokenizer is at hand: (specs, {prompt_id: partner spec})."""
    by_id = {s.prompt_id: s for s in specs}
    out, partners = [], {}
    for spec in with_candidates(specs):
        if spec.status is None:
            chosen, reason = choose_partner(spec, length, first_token)
            if chosen is None:
                spec = replace(spec, status="skipped", error=reason)
            else:
                partners[spec.prompt_id] = by_id[chosen[0]]
        out.append(spec)
    return out, partners
