"""Corrupted inputs for circuits: the same template with another subject of the same relation.

EAP-IG compares each prompt with a corrupted one position by position, so the partner must
have as many tokens. For every prompt still to compute, the partner is, among the prompts of
the same relation and template whose fact has another object and whose prompt has the same
number of tokens, the one with the smallest sha256(prompt_id, candidate prompt_id):
deterministic, independent of input order, and spread over candidates. A prompt without a
partner is skipped with the reason.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace

from .prompts import PromptSpec


def _rank(a: str, b: str) -> str:
    return hashlib.sha256(f"{a}\x1f{b}".encode()).hexdigest()


def pair_corrupted(specs: list[PromptSpec], length: Callable[[str], int]) -> tuple[list[PromptSpec], dict[str, PromptSpec]]:
    """(specs, {prompt_id: partner}); specs without a partner come back skipped with the reason.
    `length(prompt)` is the prompt's number of tokens."""
    groups: dict[tuple, list[PromptSpec]] = {}
    sizes: dict[str, int] = {}
    for spec in specs:
        if spec.status is None and spec.template is not None:
            sizes[spec.prompt_id] = length(spec.prompt)
            groups.setdefault((spec.relation, spec.template, sizes[spec.prompt_id]), []).append(spec)
    partners: dict[str, PromptSpec] = {}
    out = []
    for spec in specs:
        if spec.status is not None:
            out.append(spec)
            continue
        if spec.template is None:
            out.append(replace(spec, status="skipped", error="circuits need a template to corrupt (ready prompts have none)"))
            continue
        group = groups[(spec.relation, spec.template, sizes[spec.prompt_id])]
        candidates = [c for c in group if c.fact_id != spec.fact_id and c.object != spec.object]
        if not candidates:
            out.append(replace(spec, status="skipped", error="no other subject of this relation and template has as "
                                                                "many tokens and another object"))
            continue
        partners[spec.prompt_id] = min(candidates, key=lambda c: _rank(spec.prompt_id, c.prompt_id))
        out.append(spec)
    return out, partners
