"""`--mode trace` on a real local Ray: the traces table and prompts' p_clean / p_corrupted as the
engine computes them, the job spec and flags, a resumed run recomputes nothing."""

from __future__ import annotations

import numpy as np
import pytest

from kn_ray.engine import load_model
from kn_ray.engine.tracing import Tracer
from kn_ray.interfaces import declared
from kn_ray.pipeline.driver import run_pipeline
from kn_ray.pipeline.facts import read_facts
from kn_ray.pipeline.options import Resources, RunOptions, TraceOptions
from kn_ray.pipeline.prompts import build_prompts
from kn_ray.pipeline.rundir import RunDirectory
from kn_ray.pipeline.summary import top_traces_text
from kn_ray.pipeline.trace_tables import TRACES
from kn_ray.placement import Placement
from tests.numerics import assert_same_numbers
from tests.pipeline_fixtures import EVERY_PROMPT, pararel_slice, save_tiny_model, texts_of_pararel
from tests.readers import assert_every_reader_counts

TRACE = TraceOptions(samples=2, noise=3.0, window=2, kinds=("resid", "mlp"), seed=5)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    data = pararel_slice(root / "pararel", relations=("P17", "P19"), facts=3, templates=2)
    return dict(root=root, data=data, llama=save_tiny_model("llama", texts_of_pararel(data), root / "llama"))


def options(world, out, **kw):
    return RunOptions(Placement(str(world["llama"]), precision="fp32"), facts=str(world["data"]), output=str(out),
                      probe=EVERY_PROMPT, resources=Resources(workers=1), mode="trace", shard_size=4,
                      **{"trace": TRACE, **kw})


def test_trace_tables_equal_the_engine_and_resume(world, ray_local, tmp_path):
    out = tmp_path / "out"
    first = run_pipeline(options(world, out), progress=False)
    assert first.ok
    store = RunDirectory(out)
    assert {"prompts", "traces"} <= set(store.tables()) and "neurons" not in store.tables()
    prompts = store.read("prompts").to_pandas().set_index("prompt_id")
    traces = store.read("traces")
    assert traces.schema.equals(TRACES)
    traces = traces.to_pandas()

    lm = load_model(str(world["llama"]), device="cpu")
    specs = [s for s in build_prompts(read_facts(world["data"]), masked=False).prompts if s.status is None]
    direct = Tracer(lm, precision="fp32").trace([s.prompt for s in specs], [s.target for s in specs],
                                               [s.subject for s in specs], samples=2, noise=3.0, window=2,
                                               kinds=("resid", "mlp"), seed=5)
    ok = 0
    for spec, res in zip(specs, direct):
        row = prompts.loc[spec.prompt_id]
        assert row.status == res.status
        if not res.ok:
            assert row.error == res.reason and not (traces.prompt_id == spec.prompt_id).any()
            continue
        ok += 1
        assert_same_numbers([row.p_clean, row.p_corrupted, row.gold_prob], [res.p_clean, res.p_corrupted, res.p_clean])
        mine = traces[traces.prompt_id == spec.prompt_id].sort_values(["kind", "layer", "token"])
        K, L, T = res.p_restored.shape
        assert len(mine) == K * L * T and set(mine.kind) == {"resid", "mlp"}
        want = np.stack([res.restored(k) for k in sorted(res.kinds)])  # kind-sorted like `mine`
        assert_same_numbers(mine.p_restored.to_numpy().reshape(K, L, T), want, what=spec.prompt_id)
        assert list(mine.token_role[: T]) == res.roles and (mine.fact_id == spec.fact_id).all()
    assert ok >= len(specs) // 2
    rows = sum(marker["rows"].get("traces", 0) for marker in store.markers().values())
    assert rows == len(traces) > 0
    assert_every_reader_counts(store.path("traces"), rows)
    text = top_traces_text(store, 2)
    assert text.startswith("causal traces") and text.count("resid") == 2 and text.count("  mlp") == 2

    again = run_pipeline(options(world, out), progress=False)  # every shard is committed: nothing recomputed
    assert again.ok and again.resumed == first.shards and again.written == 0
    with pytest.raises(ValueError, match="refus|another|differ|conflict"):  # other trace options: another run
        run_pipeline(options(world, out, trace=TraceOptions(samples=3)), progress=False)


def test_trace_options_flags_and_spec():
    from kn_ray.interfaces.jobs import options_from_spec

    flags = {d.flag for d in declared.declared(RunOptions)}
    assert {"--samples", "--trace-noise", "--window", "--kinds", "--trace-seed"} <= flags
    base = dict(model="m", facts="f", output="o", attribution=dict(mode="trace"))
    spec = dict(base, trace=dict(samples=4, noise=2.0, window=6, kinds=["mlp"], seed=1))
    opts = options_from_spec(spec)
    assert opts.trace == TraceOptions(samples=4, noise=2.0, window=6, kinds=("mlp",), seed=1)
    assert opts.engine_extra() == dict(mode="trace", samples=4, noise=2.0, window=6, kinds=["mlp"], seed=1)
    with pytest.raises(ValueError, match="kinds"):
        options_from_spec(dict(base, trace=dict(kinds=["mlp", "nope"])))
    with pytest.raises(ValueError, match="samples and window"):
        options_from_spec(dict(base, trace=dict(samples=0)))
