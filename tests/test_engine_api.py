"""Engine behaviour around the numbers: probes, edits, errors, loading rules."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from kn_ray.engine import Attributor, LoadedModel, Prober, UnsupportedArchitecture, adapter_for, load_model
from kn_ray.engine.editing import add_to_value_slots, edited, save_model, set_value_slots, value_slot, word_embedding
from kn_ray.engine.precision import resolve_dtype
from kn_ray.engine.published import PublishedAttributor
from tests.tiny_models import tiny_model
from tests.numerics import assert_same_numbers, relative_error

pytestmark = pytest.mark.numerics  # comparisons of two computations: `make test-numerics` reruns them


@pytest.fixture
def llama(tmp_path):
    return LoadedModel.from_objects(*tiny_model("llama", tmp_path))


def test_published_method_agrees_with_engine(tmp_path):
    for family, prompt, target in [("gpt2", "rome is located in", " new york"), ("bert", "[MASK] is in italy", "rome")]:
        model, tok = tiny_model(family, tmp_path)
        fast = Attributor(model, tok, precision="fp32").attribute([prompt], [target], n_steps=6)[0].scores
        slow = PublishedAttributor(model, tok, precision="fp32").attribute_one(prompt, target, n_steps=6)
        assert np.abs(fast - slow).max() <= 1e-4 * np.abs(slow).max()


def test_probe_zeroing_a_whole_layer_equals_the_ig_baseline(llama):
    """Two code paths, one quantity: P with layer l's target activations at zero."""
    prompts, targets = ["the capital of france is", "the city of"], [" paris", " new york"]
    res = Attributor(llama, precision="fp32").attribute(prompts, targets, n_steps=2)
    prober = Prober(llama, precision="fp32")
    clean = prober.probe(prompts, targets)
    for layer in range(llama.num_layers):
        every = [[(layer, i) for i in range(llama.num_neurons)]] * 2
        zeroed = prober.probe(prompts, targets, neurons=every, factor=0.0)
        for r, z, c in zip(res, zeroed, clean):
            assert_same_numbers(z.gold_prob, r.baseline_prob[layer], what="zeroed layer")
            assert_same_numbers(c.gold_prob, r.gold_prob, what="clean")


def test_probe_scaling_matches_a_hand_hooked_forward(llama):
    prompt, target, neurons = "rome is located in", " italy", [(1, 3), (1, 7), (2, 0)]
    [probe] = Prober(llama, precision="fp32").probe([prompt], [target], neurons=[neurons], factor=2.0)
    ids = llama.tokenizer(prompt, return_tensors="pt").input_ids
    gold = llama.tokenizer(prompt + target).input_ids[-1]
    handles = []
    for layer in (1, 2):
        cols = [n for l, n in neurons if l == layer]

        def hook(_m, args, cols=cols):
            h = args[0].clone()
            h[0, -1, cols] *= 2.0
            return (h,)

        handles.append(llama.model.model.layers[layer].mlp.down_proj.register_forward_pre_hook(hook))
    with torch.no_grad():
        want = llama.model(ids).logits[0, -1].softmax(-1)[gold].item()
    for h in handles:
        h.remove()
    assert_same_numbers(probe.gold_prob, want, what="gold_prob")
    assert probe.n_target_tokens == 1 and probe.perplexity == pytest.approx(1 / probe.gold_prob)


def test_value_slot_edit_and_inverse_restore_the_weights(llama):
    before = {k: v.clone() for k, v in llama.model.state_dict().items()}
    slots = [(0, 1), (2, 5), (2, 6)]
    delta = word_embedding(llama, [llama.tokenizer.convert_tokens_to_ids("paris")])
    add_to_value_slots(llama, slots, 8 * delta)
    assert_same_numbers(value_slot(llama, 2, 5), before["model.layers.2.mlp.down_proj.weight"][:, 5] + 8 * delta, what="slot")
    add_to_value_slots(llama, slots, -8 * delta)
    for key, value in llama.model.state_dict().items():
        assert_same_numbers(value, before[key], what=key)
    entry = {k: v.clone() for k, v in llama.model.state_dict().items()}
    with edited(llama, slots):
        set_value_slots(llama, slots, 0.0)
        assert value_slot(llama, 0, 1).abs().sum() == 0
    for key, value in llama.model.state_dict().items():
        assert torch.equal(value, entry[key])  # exact restore


def test_gpt2_value_slots_are_conv1d_rows(tmp_path):
    lm = LoadedModel.from_objects(*tiny_model("gpt2", tmp_path))
    slot = value_slot(lm, 1, 4)
    assert slot.data_ptr() == lm.model.transformer.h[1].mlp.c_proj.weight[4].data_ptr()
    assert slot.shape == (lm.model.config.n_embd,)


def test_edited_model_saves_and_reloads(llama, tmp_path):
    set_value_slots(llama, [(1, 2)], 0.5)
    path = save_model(llama, tmp_path / "edited")
    again = load_model(str(path), device="cpu")
    assert torch.equal(value_slot(again, 1, 2), value_slot(llama, 1, 2))


def test_unusable_prompts_are_skipped_with_reasons(tmp_path):
    bert = Attributor(*tiny_model("bert", tmp_path), precision="fp32")
    res = bert.attribute(["paris is in [MASK] .", "no mask here", "", "[MASK] is [MASK]"], ["new york", "paris", "x", "rome"])
    assert [r.status for r in res] == ["skipped"] * 4
    assert "2 tokens" in res[0].reason and "one mask" in res[1].reason and "empty" in res[2].reason
    llama = Attributor(*tiny_model("llama", tmp_path), precision="fp32")
    long = " ".join(["the"] * 70)
    res = llama.attribute([long, "the city of"], [" paris", " rome"], n_steps=2)
    assert res[0].status == "skipped" and "limit of 64" in res[0].reason
    assert res[1].ok


def test_bad_arguments_are_clear_errors(llama, tmp_path):
    attr = Attributor(llama, precision="fp32")
    with pytest.raises(ValueError, match="rule must be one of"):
        attr.attribute(["the city of"], [" rome"], rule="simpson")
    with pytest.raises(ValueError, match="subset of 0..2"):
        attr.attribute(["the city of"], [" rome"], layers=[3])
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        attr.attribute(["a", "b"], [" rome"])
    with pytest.raises(ValueError, match="fp16 autocast is not supported on CPU"):
        Attributor(llama, precision="fp16")
    with pytest.raises(UnsupportedArchitecture, match="supported: .*bert.*gpt2.*llama"):
        adapter_for("t5")


def test_pickle_checkpoints_are_refused_unless_allowed(tmp_path):
    model, tok = tiny_model("gpt2", tmp_path)
    path = tmp_path / "ckpt"
    model.config.save_pretrained(path)
    tok.save_pretrained(path)
    torch.save(model.state_dict(), path / "pytorch_model.bin")  # a pickle-only checkpoint
    with pytest.raises(PermissionError, match="--allow-pickle"):
        load_model(str(path), device="cpu")
    assert load_model(str(path), device="cpu", allow_pickle=True).num_layers == 3


def test_bf16_autocast_runs_and_accumulates_in_fp32(llama):
    res = Attributor(llama, precision="bf16").attribute(["the city of"], [" rome"], n_steps=4)[0]
    ref = Attributor(llama, precision="fp32").attribute(["the city of"], [" rome"], n_steps=4)[0]
    assert res.scores.dtype == np.float32
    assert np.corrcoef(res.scores.ravel(), ref.scores.ravel())[0, 1] > 0.95


def test_out_of_memory_halves_the_batch_and_gives_the_same_scores(llama, monkeypatch):
    prompts, targets = ["the capital of france is", "rome is located in"], [" paris", " italy"]
    want = Attributor(llama, precision="fp32").attribute(prompts, targets, n_steps=4)
    attr = Attributor(llama, precision="fp32", max_batch_tokens=8)
    real_rows, seen = attr._rows, []

    def rows_with_small_memory(batch, clean, layer, pi, alpha, baseline):
        seen.append(len(pi))
        if len(pi) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_rows(batch, clean, layer, pi, alpha, baseline)

    monkeypatch.setattr(attr, "_rows", rows_with_small_memory)
    got = attr.attribute(prompts, targets, n_steps=4)
    assert attr.max_batch_tokens == 2 and max(seen) == 8 and all(r.ok for r in got)
    for g, w in zip(got, want):
        assert_same_numbers(g.scores, w.scores, what="scores")


def test_a_prompt_that_keeps_failing_is_an_error_row_and_the_rest_complete(llama, monkeypatch):
    attr = Attributor(llama, precision="fp32")
    real_batch = attr._attribute_batch

    def fail_on_rome(encs, *args):
        if any(llama.tokenizer.convert_tokens_to_ids("rome") in e.prompt_ids for e in encs):
            raise RuntimeError("bad token")
        return real_batch(encs, *args)

    monkeypatch.setattr(attr, "_attribute_batch", fail_on_rome)
    with pytest.warns(UserWarning, match="retrying them one by one"):
        res = attr.attribute(["the city of", "rome is located in", "the capital of france is"], [" rome", " italy", " paris"], n_steps=2)
    assert [r.status for r in res] == ["ok", "error", "ok"]
    assert "bad token" in res[1].reason


def test_token_ids_past_the_tokenizer_read_as_ids(llama):
    """Embedding tables are often padded past the tokenizer's vocabulary; the top token may land there."""
    attr = Attributor(llama, precision="fp32")
    n = len(llama.tokenizer)
    assert attr.token_texts([llama.tokenizer.convert_tokens_to_ids("paris"), n + 3]) == ["paris", f"<id {n + 3}>"]


def test_half_weights_compute_in_their_dtype_and_accumulate_in_fp32(tmp_path):
    model, tok = tiny_model("llama", tmp_path)
    ref = Attributor(model, tok, precision="fp32").attribute(["the city of"], [" rome"], n_steps=4)[0]
    half = LoadedModel.from_objects(copy.deepcopy(model).to(torch.bfloat16), tok)
    assert half.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="bf16 weights compute in bf16"):
        Attributor(half, precision="fp32")  # fp32 "compute" over bf16 weights would silently be bf16
    attr = Attributor(half)  # auto follows the weights
    res = attr.attribute(["the city of"], [" rome"], n_steps=4)[0]
    assert attr.precision == "bf16" and res.scores.dtype == np.float32 and isinstance(res.gold_prob, float)
    assert np.corrcoef(res.scores.ravel(), ref.scores.ravel())[0, 1] > 0.95
    assert_same_numbers(res.gold_prob, ref.gold_prob, dtype="bfloat16", reduction=48, what="gold_prob")  # the FFN inner size


def test_weight_dtype_names_and_auto():
    cpu = torch.device("cpu")
    assert resolve_dtype("auto", "bf16", cpu) == torch.float32  # CPUs keep fp32 weights unless asked
    assert resolve_dtype("bf16", "auto", cpu) == torch.bfloat16
    assert resolve_dtype(torch.float16, "fp16", cpu) == resolve_dtype("float16", "auto", cpu) == torch.float16
    with pytest.raises(ValueError, match="dtype must be one of"):
        resolve_dtype("fp8", "auto", cpu)


def test_smoothing_is_the_seeded_mean_of_noisy_copies(tmp_path):
    """nt_samples copies with stdevs 0 equal the plain result; noise is seeded and reproducible."""
    from kn_ray.engine.smoothing import embedding_noise

    model, tok = tiny_model("llama", tmp_path)
    attr = Attributor(model, tok, precision="fp32")
    prompts, targets = ["the city of", "the capital of france is"], [" rome", " paris"]
    plain = attr.attribute(prompts, targets, n_steps=4)
    zero = attr.attribute(prompts, targets, n_steps=4, nt_samples=3, stdevs=0.0)
    one = attr.attribute(prompts, targets, n_steps=4, nt_samples=3, stdevs=0.3, nt_seed=1)
    again = attr.attribute(prompts, targets, n_steps=4, nt_samples=3, stdevs=0.3, nt_seed=1)
    other = attr.attribute(prompts, targets, n_steps=4, nt_samples=3, stdevs=0.3, nt_seed=2)
    for p, z, o, a, x in zip(plain, zero, one, again, other):
        assert_same_numbers(z.scores, p.scores, what="scores")
        assert_same_numbers(z.gold_prob, p.gold_prob, what="gold_prob")
        assert z.evaluations.tolist() == [12, 12, 12]  # 3 copies x 4 left nodes
        np.testing.assert_array_equal(o.scores, a.scores)
        assert relative_error(o.scores, p.scores) > 1e-2 and relative_error(o.scores, x.scores) > 1e-2
        assert_same_numbers(o.completeness, np.abs(o.scores.sum(-1) - (o.gold_prob - o.baseline_prob)),
                            scale=max(o.gold_prob, 1e-3), what="completeness")
    # the mean really is over copies whose embeddings carry the seeded noise: recompute copy by copy
    copies = []
    for k in range(3):
        with embedding_noise(model, 0.3, torch.Generator().manual_seed(1 * 1_000_003 + k)):
            copies.append(attr.attribute(prompts, targets, n_steps=4))
    for i, o in enumerate(one):
        assert_same_numbers(o.scores, np.mean([c[i].scores for c in copies], axis=0), what="mean of copies")


def test_published_flops_are_linear_in_the_layer(tmp_path):
    """The bench counts the published method's FLOPs on its first and last layer only."""
    from kn_ray.engine.bench import count_flops

    published = PublishedAttributor(*tiny_model("llama", tmp_path), precision="fp32")
    run = lambda layers=None: count_flops(lambda: published.attribute_one("the city of", " rome", n_steps=3, layers=layers))  # noqa: E731
    assert run() == published.lm.num_layers * (run([0]) + run([published.lm.num_layers - 1])) // 2


def test_auto_batches_fill_one_pass_on_a_gpu_and_keep_32_prompts_on_a_cpu(monkeypatch, tmp_path):
    """batch_prompts auto: a CPU keeps 32 prompts a batch (a number caps it instead); a GPU takes
    as many prompts as make one pass of max_batch_tokens row-tokens, within the cap."""
    from kn_ray.engine.encoding import Encoded
    from kn_ray.engine.model_runner import AUTO_MAX_PROMPTS, CPU_BATCH_PROMPTS, batches

    model, tok = tiny_model("llama", tmp_path)
    group = [(i, Encoded(tuple(range(9)), (5, 6), 8)) for i in range(3000)]  # 9 prompt + 2 object tokens: length 10
    for cap, cpu in ((None, CPU_BATCH_PROMPTS), (7, 7), (100, 100)):
        runner = Attributor(model, tok, max_batch_prompts=cap, max_batch_tokens=4200)
        assert runner.batch_size(21, suffix_rows=True)(group) == cpu
    monkeypatch.setattr(LoadedModel, "devices", property(lambda self: [torch.device("cuda", 0)]))
    auto = Attributor(model, tok, max_batch_tokens=4200)
    assert auto.batch_size(21, suffix_rows=True)(group) == 4200 // (21 * 2)  # causal rows: the object's 2 tokens
    assert auto.batch_size(21)(group) == 4200 // (21 * 10)  # whole rows (masked LMs)
    assert auto.batch_size(1)(group) == 420  # probes: one row a prompt
    assert Attributor(model, tok, max_batch_tokens=10**9).batch_size(1)(group) == AUTO_MAX_PROMPTS
    assert Attributor(model, tok, max_batch_prompts=7, max_batch_tokens=4200).batch_size(21)(group) == 7  # a cap
    assert [len(b) for b in batches(group[:250], auto.batch_size(21, suffix_rows=True))] == [100, 100, 50]
