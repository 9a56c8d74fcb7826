"""Why an edit op found nothing to edit, in the user's terms: the selection, the aggregate's
counts and the thresholds in force (the aggregate summary), and what to change."""

from __future__ import annotations

from kn_ray.pipeline.summary import plural
from kn_ray.stages.edit.corpus import EditCorpus, read_parts
from kn_ray.stages.edit.options import EditSettings


def thresholds(parameters: dict) -> str:
    """'t = 0.2, p = 0.7 and at least 3 prompts' as the aggregate summary recorded them."""
    p = "p adapted per relation" if parameters.get("adaptive") else f"p = {parameters.get('p', '?')}"
    return f"t = {parameters.get('t', '?')}, {p} and at least {plural(parameters.get('min_prompts', '?'), 'prompt')}"


def nothing_to_edit(corpus: EditCorpus, op: str, settings: EditSettings) -> str:
    """Why `op` has no work unit for this corpus and selection, and what to change."""
    return "nothing to edit: " + _reason(corpus, op, settings)


def notes_text(notes: dict[str, str]) -> str:
    """'op, op: note' lines, ops with the same note together."""
    grouped: dict[str, list[str]] = {}
    for op, note in notes.items():
        grouped.setdefault(note, []).append(op)
    return "\n\n".join(f"{', '.join(ops)}: {note}" for note, ops in grouped.items())


def _reason(corpus: EditCorpus, op: str, settings: EditSettings) -> str:
    aggregate = corpus.run.summary("aggregate") or {}
    counts, parameters = aggregate.get("counts", {}), aggregate.get("parameters", {})
    ig = counts.get("ig", {})
    out = corpus.run
    chosen = corpus.all_facts
    if corpus.fact_ids is not None:
        chosen = chosen[chosen.fact_id.isin(corpus.fact_ids)]
    if chosen.empty and (corpus.relations or corpus.fact_ids):
        return (f"the selection has no usable prompt (status 'ok' and known) in {out.location('prompts')}. "
                "Select other relations or facts (--relation, --fact-id).")
    if chosen.empty:
        status = read_parts(out, "prompts", ["status"]).status.value_counts()
        none = ("none 'ok'" if not status.get("ok", 0) else
                "none of its ok prompts known (prompts.known; `kn-ray aggregate --include-unknown` counts them)")
        return (f"no prompt of the run is usable: {out.location('prompts')} holds "
                f"{', '.join(f'{n} {s}' for s, n in status.items()) or 'no rows'} and {none}. Their `error` "
                "column (or `kn-ray report`'s run statistics) says why; fix the input or the model and attribute again.")
    selected = len(corpus.facts(settings))
    with_neurons = ig.get("facts_with_knowledge_neurons", corpus.facts_with_neurons)  # the run's, else the selection's
    if not selected and not with_neurons:
        return (f"no fact has knowledge neurons. {out.summary_location('aggregate')} counts "
                f"{plural(ig.get('knowledge_neurons', 0), 'knowledge neuron')} (ig) over "
                f"{plural(counts.get('facts', '?'), 'fact')} with a usable prompt "
                f"({counts.get('facts_below_min_prompts', '?')} of them "
                f"{'has' if counts.get('facts_below_min_prompts') == 1 else 'have'} fewer than the "
                f"{plural(parameters.get('min_prompts', '?'), 'prompt')} required) under {thresholds(parameters)}. "
                f"To find some, aggregate again with lower thresholds (`kn-ray aggregate {out} --t 0.1 --p 0.5 "
                "--min-prompts 1`, or --adaptive), or attribute more prompts per fact (templates); a model with "
                "random weights may have none.")
    if not selected:
        some = f"{plural(with_neurons, 'fact')} of the run {'has' if with_neurons == 1 else 'have'} some"
        which = "the selected fact has no" if len(chosen) == 1 else f"none of the {len(chosen)} selected facts has"
        return f"{which} knowledge neurons ({some}). Select others (--relation, --fact-id)."
    if op == "update":
        return (f"{'the fact' if selected == 1 else f'each of the {selected} facts'} with knowledge neurons lost them all to the "
                f"shared-neuron filter (neurons of more than {settings.shared_share} of the relation's facts), or its "
                "relation has no other object to write. --keep-shared-neurons keeps the shared neurons.")
    if op == "erase":
        share = parameters.get("relation_share", "?")
        return (f"the selected relations have no relation neurons (knowledge neurons of at least {share} of a "
                f"relation's facts; {out.summary_location('aggregate')} counts {ig.get('relation_neurons', 0)} in "
                f"the run). Lower that share: `kn-ray aggregate {out} --relation-share 0.05`.")
    return f"no work unit among the {plural(selected, 'selected fact')}."
