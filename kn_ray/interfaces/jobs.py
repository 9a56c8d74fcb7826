"""Declarative job specs (YAML) -> validated `RunOptions`. The CLI flags build the same spec.

A spec is a mapping of known keys only (a typo is an error, not a silently ignored key). Its
keys, sections, accepted types and defaults are RunOptions' declarations
(`kn_ray.pipeline.options`), the same ones `kn-ray attribute`'s flags come from; see
docs/pipeline.md for a full spec::

    model: smollm2                      # required: hub id, checkpoint dir, .gguf, embedded name
    facts: builtin:demo                 # required: PARAREL dir, JSON Lines file, or builtin:NAME
    output: out/demo                    # required
    attribution: {n_steps: 20}          # sections: filters, attribution, keep, workers
"""

from __future__ import annotations

from dataclasses import replace
from importlib import resources
from pathlib import Path

from kn_ray.interfaces.declared import SpecError, from_spec
from kn_ray.pipeline.options import RunOptions

BUILTIN = "builtin:"
RENAMED = {("attribution", "method"): "attribution.rule"}  # (section, old key) -> the key it became
__all__ = ["SpecError", "load_job", "options_from_spec", "resolve_facts", "run_and_summarise"]


def load_job(path: str | Path, overrides: dict | None = None) -> RunOptions:
    """The options of the job spec at `path` (a local path or a URI such as s3://bucket/job.yaml)."""
    import yaml

    from kn_ray.pipeline.uris import read_text

    try:
        spec = yaml.safe_load(read_text(path))
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a job spec must be a mapping of keys, got {type(spec).__name__}")
    try:
        return options_from_spec({**spec, **(overrides or {})})
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def options_from_spec(spec: dict) -> RunOptions:
    """Validate a spec mapping (RunOptions' declared keys) and build the run's options."""
    for (section, old), new in RENAMED.items():
        if isinstance(spec.get(section), dict) and old in spec[section]:
            raise SpecError(f"'{section}.{old}' is now '{new}' (the integration rule: left, gausslegendre, ...); "
                            f"rename the key in section '{section}'")
    options = from_spec(RunOptions, spec)
    try:
        return replace(options, facts=resolve_facts(options.facts)).check()
    except ValueError as error:
        raise SpecError(str(error)) from None


def resolve_facts(facts: str) -> str:
    """`builtin:NAME` -> the packaged `kn_ray/data/NAME_facts.jsonl`; anything else unchanged."""
    if not facts.startswith(BUILTIN):
        return facts
    name = facts[len(BUILTIN):]
    path = resources.files("kn_ray") / "data" / f"{name}_facts.jsonl"
    if not path.is_file():
        known = sorted(p.name.removesuffix("_facts.jsonl") for p in (resources.files("kn_ray") / "data").iterdir()
                       if p.name.endswith("_facts.jsonl"))
        raise SpecError(f"no builtin fact set {name!r}; known: {', '.join(known)}")
    return str(path)


def run_and_summarise(options: RunOptions, *, progress: bool = True) -> int:
    """Run, print the summary, skip/error reasons and top neurons; 0 if every shard finished, else 1."""
    from kn_ray.pipeline.driver import run_pipeline
    from kn_ray.pipeline.summary import (plural, probe_text, reasons_text, residuals_text, summary_text,
                                         top_edges_text, top_neurons_text, top_traces_text)
    from kn_ray.pipeline.rundir import RunDirectory

    summary = run_pipeline(options, progress=progress)
    store = RunDirectory(options.output)
    top = {"circuits": top_edges_text, "trace": top_traces_text}.get(options.mode, top_neurons_text)
    texts = [summary_text(summary), probe_text(store)]
    if not options.probe.probe_only:
        texts += [reasons_text(store), top(store, options.summary_facts)]
        if options.mode == "circuits":
            texts.append(residuals_text(store))
    for text in texts:
        if text:
            print(text + "\n", flush=True)
    if not summary.ok:
        print(f"kn-ray: {plural(len(summary.failed), 'shard')} failed; re-run the same command to retry them", flush=True)
    return 0 if summary.ok else 1
