"""Declarative job specs (YAML) -> validated `RunOptions`. The CLI flags build the same spec.

A spec is a mapping of known keys only (a typo is an error, not a silently ignored key)::

    model: smollm2                      # required: hub id, checkpoint dir, .gguf, embedded name
    facts: builtin:demo                 # required: PARAREL dir, JSON Lines file, or builtin:NAME
    output: out/demo                    # required
    format: auto                        # auto | pararel | jsonl
    revision: null                      # model revision (hub)
    allow_pickle: false
    trust_remote_code: false
    dtype: auto                         # weights: auto | fp32 | bf16 | fp16 (compute: attribution.precision)
    max_memory: {0: 70GiB, cpu: 200GiB} # per actor, Accelerate's max_memory (or "0=70GiB,cpu=200GiB")
    offload_dir: null                   # per actor: offload to this local dir what fits nowhere else
    filters: {relations: [P17], max_facts_per_relation: 100, max_templates: 4}
    attribution: {n_steps: 20, method: left, tolerance: 0.01, precision: auto, batch_prompts: 32,  # n_steps: int or auto
                  nt_samples: 0, stdevs: 0.1, nt_seed: 0}                                    # smoothing: nt_samples > 0
    keep: {ratio: 0.1, dense: false, activation_ratio: 0.5, dense_dtype: float32}
    workers: {count: null, cpus: 1, gpus: null, in_flight: 2, max_attempts: 3, max_restarts: 4}  # count null: all
    shard_size: null                    # null: 64, smaller for small inputs (about 64 shards)
    report_facts: 3
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from kn_ray.pipeline.facts import Filters
from kn_ray.pipeline.options import KeepPolicy, Resources, RunOptions

_INT, _NUM, _STR, _BOOL = (int,), (int, float), (str,), (bool,)
# section -> {key: (accepted types, RunOptions / nested field)}; None: top level
SCHEMA: dict[str | None, dict[str, tuple]] = {
    None: dict(model=(_STR, "model"), facts=(_STR, "facts"), output=(_STR, "output"), format=(_STR, "facts_format"),
               revision=(_STR, "revision"), allow_pickle=(_BOOL, "allow_pickle"),
               trust_remote_code=(_BOOL, "trust_remote_code"), shard_size=(_INT, "shard_size"),
               report_facts=(_INT, "report_facts"), dtype=(_STR, "dtype"),
               max_memory=((dict, str), "max_memory"), offload_dir=(_STR, "offload_dir")),
    "filters": dict(relations=((list,), "relations"), max_facts_per_relation=(_INT, "max_facts_per_relation"),
                    max_templates=(_INT, "max_templates")),
    "attribution": dict(n_steps=((int, str), "n_steps"), method=(_STR, "method"), tolerance=(_NUM, "tolerance"),
                        precision=(_STR, "precision"), nt_samples=(_INT, "nt_samples"), stdevs=(_NUM, "stdevs"),
                        nt_seed=(_INT, "nt_seed"),
                        batch_prompts=(_INT, "batch_prompts")),
    "keep": dict(ratio=(_NUM, "ratio"), dense=(_BOOL, "dense"), activation_ratio=(_NUM, "activation_ratio"),
                 dense_dtype=(_STR, "dense_dtype")),
    "workers": dict(count=(_INT, "workers"), cpus=(_NUM, "cpus_per_worker"), gpus=(_NUM, "gpus_per_worker"),
                    in_flight=(_INT, "in_flight"), max_attempts=(_INT, "max_attempts"),
                    max_restarts=(_INT, "max_restarts")),
}
REQUIRED = ("model", "facts", "output")
BUILTIN = "builtin:"


class SpecError(ValueError):
    """A job spec that does not validate; the message names the key and the problem."""


def load_job(path: str | Path, overrides: dict | None = None) -> RunOptions:
    import yaml

    path = Path(path)
    try:
        spec = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise SpecError(f"{path}: not valid YAML: {error}") from error
    if not isinstance(spec, dict):
        raise SpecError(f"{path}: a job spec must be a mapping of keys, got {type(spec).__name__}")
    try:
        return options_from_spec({**spec, **(overrides or {})})
    except SpecError as error:
        raise SpecError(f"{path}: {error}") from None


def options_from_spec(spec: dict) -> RunOptions:
    """Validate a spec mapping (shape above) and build the run's options."""
    values = _section(spec, None)
    missing = [k for k in REQUIRED if values.get(k) is None]
    if missing:
        raise SpecError(f"missing required key(s): {', '.join(missing)}")
    nested = {name: _section(spec.get(name) or {}, name) for name in SCHEMA if name}
    if "relations" in nested["filters"]:
        nested["filters"]["relations"] = _relations(nested["filters"]["relations"])
    values["facts"] = resolve_facts(values["facts"])
    try:
        return RunOptions(**values, **nested["attribution"], filters=Filters(**nested["filters"]),
                          keep=KeepPolicy(**nested["keep"]), resources=Resources(**nested["workers"])).check()
    except ValueError as error:
        raise SpecError(str(error)) from None


def _section(mapping, name: str | None) -> dict:
    where = f"section {name!r}" if name else "the spec"
    if not isinstance(mapping, dict):
        raise SpecError(f"{where} must be a mapping, got {type(mapping).__name__}")
    fields = SCHEMA[name]
    allowed = set(fields) | ({s for s in SCHEMA if s} if name is None else set())
    unknown = sorted(set(mapping) - allowed)
    if unknown:
        raise SpecError(f"unknown key(s) in {where}: {', '.join(map(str, unknown))}; known: {', '.join(sorted(allowed))}")
    out = {}
    for key, (types, target) in fields.items():
        value = mapping.get(key)
        if value is None:
            continue
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            wanted = " or ".join(t.__name__ for t in types)
            raise SpecError(f"{(name + '.') if name else ''}{key} must be {wanted}, got {value!r}")
        out[target] = value
    return out


def _relations(value: list) -> tuple[str, ...]:
    if not all(isinstance(r, str) and r for r in value):
        raise SpecError(f"filters.relations must be a list of relation names, got {value!r}")
    return tuple(value)


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


def run_and_report(options: RunOptions, *, progress: bool = True) -> int:
    """Run, print the summary, skip/error reasons and top neurons; 0 if every shard finished, else 1."""
    from kn_ray.pipeline.driver import run_pipeline
    from kn_ray.pipeline.report import reasons_text, summary_text, top_neurons_text
    from kn_ray.pipeline.rundir import RunDirectory

    report = run_pipeline(options, progress=progress)
    store = RunDirectory(options.output)
    for text in (summary_text(report), reasons_text(store), top_neurons_text(store, options.report_facts)):
        if text:
            print(text + "\n", flush=True)
    if not report.ok:
        print(f"kn-ray: {len(report.failed)} shard(s) failed; re-run the same command to retry them", flush=True)
    return 0 if report.ok else 1
