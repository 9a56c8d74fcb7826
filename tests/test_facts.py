"""Facts in: PARAREL and JSON Lines readers, filters, prompt building, stable ids, bad records."""

from __future__ import annotations

import json

import pytest

from kn_ray.pipeline.facts import Filters, read_facts
from kn_ray.pipeline.plan import fingerprint, plan_shards
from kn_ray.pipeline.prompts import build_prompts, stable_id
from tests.pipeline_fixtures import BAD_LINES, PARAREL



def _jsonl_lines(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_pararel_facts_match_the_files_and_filters():
    facts = read_facts(PARAREL, filters=Filters(relations=("P17", "P19"), max_facts_per_relation=5)).facts
    for rel in ("P17", "P19"):
        expected = _jsonl_lines(PARAREL / "facts" / f"{rel}.jsonl")[:5]
        got = [f for f in facts if f.relation == rel]
        assert [(f.fact_id, f.subject, f.object) for f in got] == [(e["uuid"], e["sub_label"], e["obj_label"]) for e in expected]
        assert got[0].templates == tuple(t["pattern"] for t in _jsonl_lines(PARAREL / "templates" / f"{rel}.jsonl"))


def test_unknown_relation_is_refused():
    with pytest.raises(ValueError, match="P999"):
        read_facts(PARAREL, filters=Filters(relations=("P999",)))


def test_masked_prompts_use_every_template_with_a_mask():
    facts = read_facts(PARAREL, filters=Filters(relations=("P17",), max_facts_per_relation=2))
    templates = facts.facts[0].templates
    prompts = build_prompts(facts, masked=True).prompts
    assert len(prompts) == 2 * len(templates) and all(p.status is None for p in prompts)
    for p in prompts:
        assert p.prompt == p.template.replace("[X]", p.subject).replace("[Y]", "[MASK]")
        assert p.target.strip() == p.object


def test_causal_prompts_use_only_templates_ending_with_the_object():
    facts = read_facts(PARAREL, filters=Filters(relations=("P19",), max_facts_per_relation=2))
    templates = facts.facts[0].templates
    ending = [t for t in templates if t.split("[Y]")[1].strip() in ("", ".")]
    assert 0 < len(ending) < len(templates)  # the slice exercises both kinds
    built = build_prompts(facts, masked=False)
    assert built.dropped_templates == 2 * (len(templates) - len(ending))
    for p in built.prompts:
        head = p.template.split("[Y]")[0]
        assert p.prompt == head.replace("[X]", p.subject).rstrip() and not p.prompt.endswith(" ")
        assert p.target == " " + p.object


def test_max_templates_counts_usable_templates():
    facts = read_facts(PARAREL, filters=Filters(relations=("P17",), max_facts_per_relation=3))
    for masked in (True, False):
        built = build_prompts(facts, masked=masked, max_templates=2).prompts
        assert len(built) == 3 * 2


def test_ids_are_stable_and_the_plan_deterministic():
    runs = []
    for _ in range(2):
        facts = read_facts(PARAREL, filters=Filters(relations=("P19", "P17"), max_facts_per_relation=4))
        runs.append(build_prompts(facts, masked=True).prompts)
    assert runs[0] == runs[1]
    p = runs[0][0]
    assert p.fact_id in {e["uuid"] for e in _jsonl_lines(PARAREL / "facts" / f"{p.relation}.jsonl")}
    assert p.prompt_id == stable_id(p.fact_id, p.template)
    assert len({q.prompt_id for q in runs[0]}) == len(runs[0])
    assert fingerprint(plan_shards(runs[0], 10)) == fingerprint(plan_shards(runs[1], 10))


def test_shards_never_split_a_fact():
    facts = read_facts(PARAREL, filters=Filters(relations=("P17", "P19"), max_facts_per_relation=6))
    prompts = build_prompts(facts, masked=True).prompts
    shards = plan_shards(prompts, 7)
    assert [p for s in shards for p in s.prompts] == prompts
    owner = {}
    for s in shards:
        for p in s.prompts:
            assert owner.setdefault(p.fact_id, s.shard_id) == s.shard_id
    assert all(len(s) >= 7 for s in shards[:-1])


def test_every_bad_record_is_a_row_with_its_reason(tmp_path):
    path = tmp_path / "facts.jsonl"
    path.write_bytes(b"\n".join(line for line, _ in BAD_LINES) + b"\n\n")
    prompts = build_prompts(read_facts(path), masked=True).prompts
    errors = [p for p in prompts if p.status == "error"]
    good = [p for p in prompts if p.status is None]
    assert sorted(p.fact_id for p in good) == ["ok1", "ok2"]
    assert len(errors) == sum(why is not None for _, why in BAD_LINES)
    for _, why in BAD_LINES:
        if why:
            assert sum(why in p.error for p in errors) == 1, why
    for p in errors:  # every error row is writable text
        for value in (p.subject, p.object, p.error, p.relation):
            value.encode("utf-8")
    again = build_prompts(read_facts(path), masked=True).prompts
    assert [p.prompt_id for p in again] == [p.prompt_id for p in prompts]


def test_auto_shards_hold_one_engine_batch_unless_the_actors_would_idle():
    from kn_ray.engine.model_runner import CPU_BATCH_PROMPTS
    from kn_ray.pipeline.plan import BATCH_SHARD, MIN_AUTO_SHARD, auto_shard_size

    assert BATCH_SHARD == CPU_BATCH_PROMPTS  # a run's prompts share the engine's passes
    # one actor: the size depends on the input only, as it always did
    assert [auto_shard_size(n) for n in (1, 6, 2048, 64 * 40, 10**6)] == [32, 32, 32, 40, 64]
    assert all(auto_shard_size(n, 1) == auto_shard_size(n) for n in (1, 6, 100, 2048, 10**6))
    # several actors and a small input: one shard each, never under MIN_AUTO_SHARD prompts
    assert [auto_shard_size(n, 2) for n in (6, 24, 100, 128)] == [MIN_AUTO_SHARD, 12, 32, 32]
    assert auto_shard_size(100, 8) == 13  # 8 shards for 8 GPU actors (the input-only rule: 4 of 32)
    assert auto_shard_size(20, 8) == MIN_AUTO_SHARD
    # a big cluster: at least two shards per actor, each of at least one engine batch
    assert auto_shard_size(4096, 50) == 32 and 4096 // 32 >= 2 * 50
    assert auto_shard_size(10**6, 50) == 64
