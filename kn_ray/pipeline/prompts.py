"""From facts to prompts: one `PromptSpec` per (fact, template) or ready prompt.

Masked LMs read the whole template with [Y] -> [MASK]. Causal LMs can only predict an
object that ends the sentence, so they use the templates whose [Y] is followed by nothing
or a full stop; the others are dropped (counted, not rows). Every bad record or template
becomes a row with status `error` and its reason. Ids are stable: a prompt id hashes its
fact id and template (or ready prompt), a bad record's hashes its file and line.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass

from .facts import BadRecord, Fact, FactSet, text_problem

SUBJECT, OBJECT, MASK = "[X]", "[Y]", "[MASK]"
CAUSAL_TAILS = ("", ".")  # what may follow [Y] in a template usable by a causal LM


@dataclass(frozen=True)
class PromptSpec:
    prompt_id: str
    fact_id: str
    relation: str
    subject: str
    object: str
    template: str | None
    prompt: str
    target: str
    status: str | None = None  # None: to compute; "error" / "skipped": decided before the model runs
    error: str | None = None
    corrupt: tuple = ()  # circuits: candidate corrupted prompts ((prompt_id, prompt, object), ...), `corrupt.py`
    # the probe's reading (`known.py`): set once the prompt is probed
    gold_rank: int | None = None
    known: bool | None = None
    gold_prob: float | None = None
    top_token: str | None = None
    top_prob: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass
class PromptSet:
    prompts: list[PromptSpec]
    dropped_templates: int  # (fact, template) pairs a causal LM cannot use

    def require(self, where: str, model: str) -> "PromptSet":
        """Self, or a ValueError saying why `where` gives `model` no prompt."""
        if self.prompts:
            return self
        raise ValueError(f"{where}: no prompts for {model}: "
                         f"{'its one template puts' if self.dropped_templates == 1 else f'every one of its {self.dropped_templates} templates puts'} "
                         f"{OBJECT} before the end of the sentence, which a causal LM cannot predict; give templates "
                         f"ending in {OBJECT} (or '{OBJECT}.'), or a masked LM")


def stable_id(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def build_prompts(facts: FactSet, *, masked: bool, max_templates: int | None = None) -> PromptSet:
    """Prompts for every fact plus an error row per bad record, sorted by (relation, fact, input order)."""
    rows: list[tuple[tuple, PromptSpec]] = []
    dropped = 0
    for fact in facts.facts:
        specs, n_dropped = _fact_prompts(fact, masked, max_templates)
        dropped += n_dropped
        rows.extend(((fact.relation, fact.fact_id, i), spec) for i, spec in enumerate(specs))
    for bad in facts.bad:
        spec = _bad_row(bad)
        rows.append(((bad.relation, bad.fact_id or spec.prompt_id, 0), spec))
    rows.sort(key=lambda pair: pair[0])
    return PromptSet([spec for _, spec in rows], dropped)


def _fact_prompts(fact: Fact, masked: bool, max_templates: int | None) -> tuple[list[PromptSpec], int]:
    specs, seen, dropped, used = [], set(), 0, 0
    texts = [(t, True) for t in fact.templates] + [(p, False) for p in fact.prompts]
    for text, is_template in texts:
        key = stable_id(fact.fact_id, text)
        row = dict(prompt_id=key, fact_id=fact.fact_id, relation=fact.relation, subject=fact.subject,
                   object=fact.object, template=text if is_template else None)
        problem = text_problem("template" if is_template else "prompt", text)
        if problem is None and key in seen:
            problem = f"duplicate {'template' if is_template else 'prompt'} for this fact"
            row["prompt_id"] = stable_id(fact.fact_id, text, str(len(specs)))
        if problem is None and is_template:
            problem = template_problem(text)
        if problem:
            specs.append(error_row(**row, error=problem))
            continue
        seen.add(key)
        pair = fill_template(text, fact, masked) if is_template else ready_prompt(text, fact, masked)
        if pair is None:
            dropped += 1
            continue
        if max_templates is not None and used >= max_templates:
            continue
        used += 1
        specs.append(PromptSpec(**row, prompt=pair[0], target=pair[1]))
    return specs, dropped


def template_problem(template: str) -> str | None:
    for marker in (SUBJECT, OBJECT):
        if (n := template.count(marker)) != 1:
            return f"template must contain {marker} exactly once, found {n}"
    return None


def _target(before: str, fact: Fact) -> str:
    """The object with a leading space when the text before it ends in one (BPE tokens differ)."""
    if fact.target is not None:
        return fact.target
    return (" " if before[-1:].isspace() else "") + fact.object


def fill_template(template: str, fact: Fact, masked: bool) -> tuple[str, str] | None:
    """(prompt, target), or None when a causal LM cannot use the template."""
    head, tail = template.split(OBJECT)
    if masked:
        return (head + MASK + tail).replace(SUBJECT, fact.subject), _target(head, fact)
    if tail.strip() not in CAUSAL_TAILS or SUBJECT not in head or not head.strip():
        return None
    return head.replace(SUBJECT, fact.subject).rstrip(), _target(head, fact)


def ready_prompt(prompt: str, fact: Fact, masked: bool) -> tuple[str, str]:
    if masked:
        return prompt, _target(prompt.split(MASK)[0], fact)
    return prompt.rstrip(), _target(" ", fact)  # a causal prompt is the text before " object"


def _bad_row(bad: BadRecord) -> PromptSpec:
    return error_row(prompt_id=stable_id("bad", bad.where), fact_id=bad.fact_id, relation=bad.relation,
                     subject=bad.subject, object=bad.object, template=None, error=f"{bad.where}: {bad.reason}")


def error_row(*, error: str, **fields) -> PromptSpec:
    """A row that never reaches the model; its text is made encodable (lone surrogates -> '?')."""
    safe = {k: _encodable(v) for k, v in fields.items()}
    return PromptSpec(**safe, prompt="", target="", status="error", error=_encodable(error))


def _encodable(value):
    return value.encode("utf-8", "replace").decode("utf-8") if isinstance(value, str) else value
