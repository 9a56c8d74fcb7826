"""Job specs: validation, the shipped jobs, CLI flags = spec, and a real Ray Job submission."""

from __future__ import annotations

import argparse
import dataclasses
import shlex
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml

from kn_ray.interfaces import declared as declared_mod
from kn_ray.interfaces.cli import build_parser, main
from kn_ray.interfaces.commands.attribute import spec_from_args
from kn_ray.interfaces.commands.bench import BenchOptions
from kn_ray.interfaces.commands.fetch import FetchOptions
from kn_ray.interfaces.commands.report import ReportOptions
from kn_ray.interfaces.commands.run import JobRun
from kn_ray.interfaces.commands.submit import Submission, entrypoint
from kn_ray.interfaces.jobs import SpecError, load_job, options_from_spec
from kn_ray.pipeline.facts import read_facts
from kn_ray.pipeline.options import RunOptions
from kn_ray.placement import Placement
from kn_ray.pipeline.prompts import build_prompts
from kn_ray.stages.aggregate import AggregateParams
from kn_ray.stages.edit.options import EditOptions
from kn_ray.stages.explore.options import ExploreOptions
from kn_ray.pipeline.rundir import RunDirectory
from tests.ray_head import running_head
from tests.s3_server import BUCKET, s3_server  # noqa: F401  (a fixture)

ROOT = Path(__file__).resolve().parents[1]
BASE = dict(model="m", facts="f.jsonl", output="out")


def test_demo_job_uses_the_bundled_facts():
    options = load_job(ROOT / "jobs" / "demo.yaml")
    assert options.placement.model == "smollm2" and Path(options.facts).name == "demo_facts.jsonl"
    facts = read_facts(options.facts)
    assert not facts.bad and 6 <= len(facts.facts) <= 10
    prompts = build_prompts(facts, masked=False).prompts
    per_fact = {f.fact_id: sum(p.fact_id == f.fact_id for p in prompts) for f in facts.facts}
    assert set(per_fact.values()) <= {3, 4} and all(p.status is None for p in prompts)


@pytest.mark.parametrize("spec, message", [
    (dict(BASE, modle="x"), "unknown key(s) in the spec: modle"),
    (dict(BASE, attribution=dict(n_step=3)), "unknown key(s) in section 'attribution': n_step"),
    (dict(BASE, attribution=dict(n_steps="20")), "n_steps must be >= 1 or 'auto', got '20'"),
    (dict(BASE, attribution=dict(n_steps=2.5)), "n_steps must be int or str"),
    (dict(BASE, attribution=dict(n_steps="auto", tolerance=0)), "tolerance must be > 0"),
    (dict(BASE, attribution=dict(n_steps=0)), "n_steps must be >= 1"),
    (dict(BASE, attribution=dict(rule="simpson")), "rule must be one of"),
    (dict(BASE, keep=dict(ratio=1.5)), "ratio must be in [0, 1]"),
    (dict(BASE, keep=dict(dense="yes")), "keep.dense must be bool"),
    (dict(BASE, workers=dict(count=0)), "workers must be >= 1"),
    (dict(BASE, filters=dict(relations="P17")), "relations must be list"),
    (dict(BASE, filters=[1]), "section 'filters' must be a mapping"),
    (dict(model="m", facts="f"), "missing required key(s): output"),
    (dict(BASE, dtype="int8"), "dtype must be one of auto, fp32, bf16, fp16"),
    (dict(BASE, max_memory="0:70GiB"), "max_memory takes device=size pairs"),
    (dict(BASE, max_memory=[1]), "max_memory must be dict or str"),
    (dict(BASE, facts="builtin:nope"), "no builtin fact set 'nope'; known: demo"),
])
def test_invalid_specs_say_what_is_wrong(spec, message):
    with pytest.raises(SpecError) as error:
        options_from_spec(spec)
    assert message in str(error.value)


def test_cli_flags_describe_the_same_run_as_a_spec(tmp_path):
    args = build_parser().parse_args(
        ["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out", "--relations", "P17,P19",
         "--max-templates", "2", "--n-steps", "7", "--keep-ratio", "0.2", "--workers", "2", "--shard-size", "5"])
    spec = dict(BASE, shard_size=5, filters=dict(relations=["P17", "P19"], max_templates=2),
                attribution=dict(n_steps=7), keep=dict(ratio=0.2), workers=dict(count=2))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    assert options_from_spec(spec_from_args(args)) == load_job(tmp_path / "job.yaml")


def test_big_model_flags_describe_the_same_run_as_a_spec(tmp_path):
    args = build_parser().parse_args(
        ["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out", "--dtype", "bf16", "--precision", "bf16",
         "--max-memory", "0=70GiB,1=70GiB,cpu=200GiB", "--offload-dir", "/tmp/off", "--gpus-per-worker", "2"])
    spec = dict(BASE, dtype="bf16", max_memory={0: "70GiB", 1: "70GiB", "cpu": "200GiB"}, offload_dir="/tmp/off",
                attribution=dict(precision="bf16"), workers=dict(gpus=2))
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(spec))
    options = load_job(tmp_path / "job.yaml")
    assert options_from_spec(spec_from_args(args)) == options
    assert options.placement.max_memory == {0: "70GiB", 1: "70GiB", "cpu": "200GiB"} and options.placement.dtype == "bf16"


@pytest.mark.parametrize("job", sorted(p.name for p in (ROOT / "jobs").glob("*.yaml")))
def test_shipped_jobs_validate(job):
    options = load_job(ROOT / "jobs" / job)
    assert options.placement.model and options.output


def test_big_model_jobs_split_models_as_documented():
    eight = load_job(ROOT / "jobs" / "llama3-8b-8gpu.yaml")
    assert eight.placement.dtype == "bf16" and eight.placement.gpus_per_worker == 1 and eight.resources.workers == 8
    seventy = load_job(ROOT / "jobs" / "llama3-70b-4gpu-actors.yaml")
    assert seventy.placement.gpus_per_worker == 4 and seventy.placement.dtype == "bf16"
    assert set(seventy.placement.max_memory) == {0, 1, 2, 3, "cpu"}


def test_auto_steps_from_flags_and_spec_enter_the_run_identity(tmp_path):
    args = build_parser().parse_args(["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out",
                                      "--n-steps", "auto", "--tolerance", "0.001", "--method", "gausslegendre"])
    spec = dict(BASE, attribution=dict(n_steps="auto", tolerance=0.001, rule="gausslegendre"))  # --method: --rule's alias
    options = options_from_spec(spec_from_args(args))
    assert options == options_from_spec(spec)
    assert options.attribution()["tolerance"] == 0.001 and options.engine_extra() == dict(tolerance=0.001)
    assert options_from_spec(BASE).attribution()["n_steps"] == "auto"  # the default
    paper = options_from_spec(dict(BASE, attribution=dict(n_steps=20, rule="left")))
    assert paper.attribution() == dict(n_steps=20, rule="left", precision="auto")  # fixed rules keep their old identity
    live = options_from_spec(dict(BASE, attribution=dict(n_steps=20, post_norm="live")))
    assert live.engine_extra() == dict(post_norm="live")  # the default post_norm (frozen) keeps the identity
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attribute", "--model", "m", "--facts", "f", "--output", "o", "--n-steps", "many"])


def test_smoothing_flags_and_spec_enter_the_run_identity():
    args = build_parser().parse_args(["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out",
                                      "--nt-samples", "8", "--stdevs", "0.2", "--nt-seed", "3"])
    options = options_from_spec(spec_from_args(args))
    assert options == options_from_spec(dict(BASE, attribution=dict(nt_samples=8, stdevs=0.2, nt_seed=3)))
    assert options.engine_extra() == dict(tolerance=0.01, nt_samples=8, stdevs=0.2, nt_seed=3)  # n_steps: auto
    assert options.attribution()["nt_samples"] == 8 and "nt_samples" not in options_from_spec(BASE).attribution()
    with pytest.raises(SpecError, match="nt_samples and stdevs must be >= 0"):
        options_from_spec(dict(BASE, attribution=dict(nt_samples=2, stdevs=-1)))


def test_weight_noise_flags_and_spec_enter_the_run_identity():
    args = build_parser().parse_args(["attribute", "--model", "m", "--facts", "f.jsonl", "--output", "out",
                                      "--nt-samples", "10", "--noise", "weights", "--weight-stdevs", "0.1",
                                      "--noised-weights", "above"])
    options = options_from_spec(spec_from_args(args))
    assert options == options_from_spec(dict(BASE, attribution=dict(nt_samples=10, noise="weights", weight_stdevs=0.1,
                                                                     noised_weights="above")))
    # input noise's stdevs does not apply to NoiseGrad; FusionGrad records both
    assert options.engine_extra() == dict(tolerance=0.01, nt_samples=10, nt_seed=0, noise="weights", weight_stdevs=0.1,
                                          noised_weights="above")
    fusion = options_from_spec(dict(BASE, attribution=dict(nt_samples=4, noise="both")))
    assert fusion.attribution()["stdevs"] == 0.1 and fusion.attribution()["weight_stdevs"] == 0.2
    for bad, match in [(dict(noise="grad"), "noise must be one of"), (dict(noised_weights="below"), "noised_weights"),
                       (dict(weight_stdevs=-1.0), "weight_stdevs must be >= 0")]:
        with pytest.raises(SpecError, match=match):
            options_from_spec(dict(BASE, attribution=dict(nt_samples=2, **bad)))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["attribute", "--model", "m", "--facts", "f", "--output", "o", "--noise", "grad"])
    from inspect import signature

    from kn_ray.engine import Attributor  # the workers pass engine_extra() on as these keywords
    assert set(fusion.engine_extra()) <= set(signature(Attributor.attribute).parameters)


def test_cli_reports_a_bad_spec_with_exit_code_2(tmp_path, capsys):
    (tmp_path / "job.yaml").write_text("model: m\nfacts: f\noutput: o\nshard_size: -1\n")
    assert main(["run", str(tmp_path / "job.yaml")]) == 2
    assert "shard_size must be >= 1" in capsys.readouterr().err
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    assert main(["run", str(tmp_path / "bad.yaml")]) == 2
    assert "not valid YAML" in capsys.readouterr().err


def test_submit_needs_the_spec_in_the_working_dir_and_an_absolute_output(tmp_path):
    (tmp_path / "wd").mkdir()
    spec = tmp_path / "wd" / "job.yaml"
    spec.write_text(yaml.safe_dump(dict(BASE)))
    with pytest.raises(ValueError, match="relative"):
        entrypoint(spec, tmp_path / "wd", None)
    command = entrypoint(spec, tmp_path / "wd", "/abs/out")
    assert command.endswith("run job.yaml --no-progress --output /abs/out")
    with pytest.raises(ValueError, match="not inside the working dir"):
        entrypoint(spec, tmp_path / "elsewhere", "/abs/out")
    for uri in ("s3://bucket/runs/a b", "gs://bucket/run", "file:///abs/run"):  # any URI, quoted for the shell
        assert shlex.split(entrypoint(spec, tmp_path / "wd", uri))[-2:] == ["--output", uri]
    spec.write_text(yaml.safe_dump(dict(BASE, output="s3://bucket/run")))
    assert entrypoint(spec, tmp_path / "wd", None).endswith("run job.yaml --no-progress")
    with pytest.raises(ValueError, match="'rel/out' is relative; give an absolute path on the cluster"):
        entrypoint(spec, tmp_path / "wd", "rel/out")
    uri = f"file://{spec}"  # a spec URI: read as it is, by the cluster, wherever it lies
    assert load_job(uri).output == "s3://bucket/run"
    assert shlex.split(entrypoint(uri, tmp_path / "elsewhere", None))[-2:] == [uri, "--no-progress"]
    with pytest.raises(FileNotFoundError, match="no such file"):
        load_job(f"file://{tmp_path}/missing.yaml")


# ---- a real cluster --------------------------------------------------------------------------
@pytest.mark.slow
def test_submit_writes_to_a_bucket_and_the_stages_read_it(s3_server, tmp_path):
    """`kn-ray submit --output s3://...` to a `ray start --head` with its dashboard (AWS settings in
    the cluster's environment, as a pod's): the job succeeds and every prompt is in the bucket
    once; aggregate, edit and report take the URI; a failing job exits 1."""
    from tests.pipeline_fixtures import save_tiny_model

    facts = tmp_path / "facts.jsonl"
    facts.write_text('{"id": "f1", "relation": "capital", "subject": "France", "object": "Paris", '
                     '"templates": ["The capital of [X] is [Y] .", "[X] has capital [Y] ."]}\n'
                     '{"id": "f2", "relation": "capital", "subject": "Japan", "object": "Tokyo", '
                     '"prompts": ["The capital of Japan is"]}\n')
    model = save_tiny_model("llama", [facts.read_text()], tmp_path / "model")
    work = tmp_path / "work"
    work.mkdir()
    (work / "job.yaml").write_text(yaml.safe_dump(dict(
        model=str(model), facts=str(facts), output="relative/out", attribution=dict(n_steps=3),
        probe=dict(known="any"), workers=dict(count=2), shard_size=1)))
    uri = f"s3://{BUCKET}/submitted/run"
    with running_head(dashboard=True, num_cpus=2) as head:
        submit = [sys.executable, "-m", "kn_ray.interfaces.cli", "submit", "job.yaml", "--address", head.dashboard]
        done = subprocess.run(submit + ["--working-dir", ".", "--output", uri], cwd=work, env=head.env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "SUCCEEDED" in done.stdout and "3 done, 0 skipped, 0 errors" in done.stdout
        (work / "job.yaml").write_text(yaml.safe_dump(dict(model=str(tmp_path / "no-such-model"), facts=str(facts),
                                                           output=f"s3://{BUCKET}/submitted/failing")))
        failed = subprocess.run(submit, cwd=work, env=head.env, capture_output=True, text=True, timeout=300)
        assert failed.returncode == 1 and "FAILED" in failed.stdout, failed.stdout + failed.stderr
    run = RunDirectory(uri)
    prompts = run.read("prompts").to_pandas()
    assert sorted(prompts["fact_id"]) == ["f1", "f1", "f2"] and set(prompts["status"]) == {"ok"}
    assert run.read("neurons").num_rows > 0 and run.record().options["output"] == uri
    assert main(["aggregate", uri, "--p", "0.3", "--min-prompts", "1"]) == 0
    assert main(["edit", uri, "--op", "suppress", "--no-progress"]) == 0
    assert main(["report", uri]) == 0
    assert run.exists("edits.json") and run.exists("report", "index.html")


# ---- options declared once: flags and spec keys derived from the dataclasses -------------------
def _sample(d):
    """A value other than the default, as the CLI writes it and as the dataclass holds it."""
    cli, bases = d.meta["cli"], declared_mod._bases(d.hint)
    if cli.get("action") == "store_const":
        return None, cli["const"]
    if cli.get("action") == "append":
        return "K=a,b", ("K=a,b",)
    if d.meta["choices"]:
        value = next(c for c in reversed(d.meta["choices"]) if c != d.default)
        return value, (value,) if d.listed else value
    if bases[0] is bool:
        return None, True
    if bases[0] is tuple:
        return "a,b", ("a", "b")
    if bases[0] is dict:
        return "0=1GiB", "0=1GiB"
    if bases[0] is int:
        return "7", 7
    if bases[0] is float:
        return "0.25", 0.25
    return "some-value", "some-value"


def _get(obj, path):
    for name in path:
        obj = getattr(obj, name)
    return obj


REQUIRED_ARGS = ["--model", "m", "--facts", "f.jsonl", "--output", "out"]
COMMANDS = [("attribute", RunOptions, REQUIRED_ARGS, dict(placement=Placement("m"), facts="f.jsonl", output="out")),
            ("aggregate", AggregateParams, ["OUT"], {}), ("edit", EditOptions, ["OUT"], {}),
            ("explore", ExploreOptions, ["OUT"], {}), ("bench", BenchOptions, [], {}), ("fetch", FetchOptions, [], {}),
            ("report", ReportOptions, ["A", "B"], dict(out=("A", "B"))), ("run", JobRun, ["j.yaml"], dict(spec="j.yaml")),
            ("submit", Submission, ["j.yaml", "--address", "http://h"], dict(spec="j.yaml", address="http://h"))]


@pytest.mark.parametrize("command, cls, required, values", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_option_has_one_default_for_cli_and_spec(command, cls, required, values):
    args = build_parser().parse_args([command, *required])
    assert declared_mod.from_args(cls, args) == cls(**values)  # unset flags: the dataclass defaults
    if cls is RunOptions:
        assert declared_mod.from_spec(cls, BASE) == cls(**values)  # absent keys: the same defaults
        assert options_from_spec(spec_from_args(args)) == options_from_spec(BASE)


@pytest.mark.parametrize("command, cls, required, values", COMMANDS, ids=[c[0] for c in COMMANDS])
def test_every_dataclass_field_is_a_flag_and_a_spec_key(command, cls, required, values):
    def leaves(c, path=()):
        for f in dataclasses.fields(c):
            hint = typing.get_type_hints(c)[f.name]
            if dataclasses.is_dataclass(hint):
                yield from leaves(hint, path + (f.name,))
            elif not (c is EditOptions and f.name == "placement"):  # overrides of run.json's: below
                yield path + (f.name,)

    options = declared_mod.declared(cls)
    assert {d.path for d in options} == set(leaves(cls))  # nothing undeclared
    assert len({d.flag for d in options}) == len(options)  # no flag twice
    assert len({(d.section, d.key) for d in options}) == len(options)  # no spec key twice
    help_text = _help_of(command)
    for d in options:
        assert d.flag in help_text
        if d.meta["positional"]:  # given in `required`
            continue
        text, value = _sample(d)
        argv = [command, *required, d.flag] + ([] if text is None else [text])
        got = declared_mod.from_args(cls, build_parser().parse_args(argv))
        assert _get(got, d.path) == value, d.flag
        if cls is RunOptions:  # the same option through a job spec
            spec = dict(BASE)
            (spec.setdefault(d.section, {}) if d.section else spec)[d.key] = list(value) if isinstance(value, tuple) \
                else value
            assert declared_mod.from_spec(cls, spec) == got, d.key


def _help_of(command: str) -> str:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command].format_help()


def test_declared_choices_hold_for_flags_specs_and_the_python_api():
    """A value outside the declared choices fails the same way however it arrives, item by item for lists."""
    with pytest.raises(SpecError, match="attribution.mode must be one of neurons, circuits, trace, got 'edges'"):
        declared_mod.from_spec(RunOptions, dict(BASE, attribution=dict(mode="edges")))
    with pytest.raises(ValueError, match="mode must be one of"):
        dataclasses.replace(options_from_spec(BASE), mode="edges").check()
    with pytest.raises(SystemExit):
        build_parser().parse_args(["edit", "OUT", "--op", "suppress,supress"])
    with pytest.raises(ValueError, match="ops must be one of .* got 'supress'"):
        EditOptions(ops=("suppress", "supress")).check()
    assert declared_mod.from_args(EditOptions, build_parser().parse_args(["edit", "OUT", "--op", "erase,update"])
                                  ).ops == ("erase", "update")


def test_progress_is_one_flag_on_every_long_command():
    for command, required in (("attribute", REQUIRED_ARGS), ("run", ["j.yaml"]), ("edit", ["OUT"])):
        assert build_parser().parse_args([command, *required, "--no-progress"]).no_progress
        assert not build_parser().parse_args([command, *required]).no_progress


def test_help_shows_the_dataclass_defaults():
    text = " ".join(_help_of("attribute").split())
    assert "see --tolerance; circuits: their own fixed rule) (default: auto)" in text and "(default: 0.1)" in text and "(default: auto)" in text
    assert "(default: 0.7)" in " ".join(_help_of("aggregate").split())


def test_the_documented_spec_shows_the_declared_defaults():
    text = (ROOT / "docs" / "pipeline.md").read_text()
    block = text.split("## Job specs")[1].split("```yaml\n")[1].split("```")[0]
    documented = {k: v for k, v in yaml.safe_load(block).items() if k not in ("model", "facts", "output")}
    assert documented == declared_mod.spec_defaults(RunOptions)


def test_actors_of_several_gpus_load_with_a_balanced_device_map(monkeypatch):
    import kn_ray.engine
    from kn_ray.pipeline import execute, ray_cluster

    loads = []
    monkeypatch.setattr(kn_ray.engine, "load_model", lambda name, **kwargs: loads.append(kwargs))
    for gpus, device_map in ((4, "auto"), (1, None), (None, None)):
        options = options_from_spec(dict(BASE, dtype="bf16", max_memory="0=60GiB,cpu=1GiB", workers=dict(gpus=gpus)))
        spec = execute.attribution_actors(options)
        (placement,) = spec.args
        assert placement == options.placement and spec.gpus == gpus  # Ray reserves what the placement asks
        placement.load()  # what each actor does
        assert loads[-1]["device_map"] == device_map
        assert loads[-1]["dtype"] == "bf16" and loads[-1]["max_memory"] == {0: "60GiB", "cpu": "1GiB"}
    cpu, gpu = dict(num_cpus=2, num_gpus=0), dict(num_cpus=8, num_gpus=1)
    assert "(2 torch threads each)" in ray_cluster.describe_plan(3, cpu, False)
    assert "(4 torch threads each)" in ray_cluster.describe_plan(3, cpu, False, threads=4)  # --threads-per-worker
    assert "thread" not in ray_cluster.describe_plan(3, gpu, False)


def test_edit_takes_attributes_placement_flags_as_overrides_of_the_run():
    """Every placement flag of `kn-ray attribute` is a flag of `kn-ray edit`; set, it overrides
    run.json's placement; unset, run.json's value stays."""
    from kn_ray.pipeline.record import RunRecord

    attribute_flags = {d.flag for d in declared_mod.declared(RunOptions) if d.path[0] == "placement"}
    help_text = _help_of("edit")
    record = RunRecord(identity=dict(model="run-model", model_info=dict(precision="bf16", dtype="fp32")),
                       options=dict(placement=dict(Placement("run-model", revision="r1", max_memory={"cpu": "1GiB"},
                                                             offload_dir="/off", batch_prompts=8).as_dict())))
    assert record.placement() == Placement("run-model", revision="r1", precision="bf16", dtype="fp32",
                                           max_memory={"cpu": "1GiB"}, offload_dir="/off", batch_prompts=8)
    for bad, message in ((dict(max_memory="0:1GiB"), "max_memory takes device=size pairs"),
                         (dict(batch_prompts=0), "batch_prompts must be >= 1 or 'auto'")):
        with pytest.raises(ValueError, match=message):
            record.placement(**bad)
    for d in declared_mod.declared(Placement):
        assert d.flag in attribute_flags and d.flag in help_text
        text, value = _sample(d)
        args = build_parser().parse_args(["edit", "OUT", d.flag] + ([] if text is None else [text]))
        overrides = declared_mod.overrides(Placement, args)
        assert overrides == {d.dest: value}
        options = declared_mod.from_args(EditOptions, args, placement=overrides)
        placement = record.placement(**options.check().placement)
        expected = Placement("run-model", revision="r1", precision="bf16", dtype="fp32", max_memory={"cpu": "1GiB"},
                             offload_dir="/off", batch_prompts=8)
        if d.dest == "model":
            expected = dataclasses.replace(expected, revision=None)  # another model: not the run's revision
        assert placement == dataclasses.replace(expected, **{d.dest: value}).check(), d.flag


def test_default_cpu_plan_is_one_actor_per_group_of_up_to_8_cores(monkeypatch):
    from kn_ray.pipeline import ray_cluster
    from kn_ray.pipeline.options import Resources

    for nodes, want in (([2], (1, 2)), ([16], (2, 8)), ([12], (2, 6)), ([0, 1, 1], (2, 1)), ([3, 16], (6, 3))):
        monkeypatch.setattr(ray_cluster.ray, "nodes", lambda: [dict(Alive=True, Resources=dict(CPU=c)) for c in nodes])
        monkeypatch.setattr(ray_cluster.ray, "cluster_resources", lambda: dict(CPU=sum(nodes)))
        count, opts = ray_cluster.actor_resources(Resources())
        assert (count, opts["num_cpus"]) == want, nodes
    assert ray_cluster.actor_resources(Resources(cpus_per_worker=1))[1]["num_cpus"] == 1  # an explicit size wins
    assert ray_cluster.actor_resources(Resources(workers=2))[1]["num_cpus"] == 3  # N workers share the CPUs
    assert ray_cluster.actor_resources(Resources(workers=1))[1]["num_cpus"] == 3  # never more than a node's group
    monkeypatch.setattr(ray_cluster.ray, "cluster_resources", lambda: dict(CPU=19, GPU=2))
    assert ray_cluster.actor_resources(Resources()) == (2, ray_cluster.actor_resources(Resources(cpus_per_worker=1))[1])


def test_the_old_attribution_method_key_names_the_new_one(tmp_path):
    spec = tmp_path / "old.yaml"
    spec.write_text("model: m\nfacts: f.jsonl\noutput: out\nattribution:\n  method: left\n")
    with pytest.raises(SpecError, match=r"'attribution\.method' is now 'attribution\.rule'"):
        load_job(spec)


def test_attribute_help_names_both_modes_first():
    description = build_parser()._subparsers._group_actions[0].choices["attribute"].description
    first = description.splitlines()[0]
    assert "knowledge neurons" in first and "circuit" in first


def test_a_local_ray_chooses_token_auth_explicitly(monkeypatch):
    """Ray warns on every run when it turns token auth on by default; set explicitly, it is quiet."""
    from kn_ray.pipeline import ray_env

    for name in ("RAY_ADDRESS", "RAY_AUTH_MODE", ray_env.LOOPBACK_ONLY[0]):
        monkeypatch.delenv(name, raising=False)
    ray_env.prepare()
    import os

    assert os.environ["RAY_AUTH_MODE"] == "token" and os.environ[ray_env.LOOPBACK_ONLY[0]] == "0"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the user's choice stands
    ray_env.prepare()
    assert os.environ["RAY_AUTH_MODE"] == "disabled"


def test_no_progress_switches_off_library_bars(monkeypatch):
    from transformers.utils import logging as hf_logging

    from kn_ray.interfaces.commands import Progress
    from kn_ray.pipeline import ray_env

    monkeypatch.delenv(ray_env.NO_PROGRESS_BARS, raising=False)
    try:
        assert Progress.apply(argparse.Namespace(no_progress=True)) is False
        assert not hf_logging.is_progress_bar_enabled()
        import os

        assert os.environ[ray_env.NO_PROGRESS_BARS] == "1" and ray_env.NO_PROGRESS_BARS in ray_env.FORWARDED
    finally:
        hf_logging.enable_progress_bar()
