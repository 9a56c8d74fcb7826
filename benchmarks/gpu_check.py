"""One call on a GPU machine: is kn-ray exact there, how fast is it, and what memory does it take.

    python benchmarks/gpu_check.py OUT_DIR [--smoke] [--smollm2 PATH] [--budget-s S]

Needs torch and transformers (no ray, no network). Each part gets a share of a time budget
(default 420 s on a GPU) and is not started when too little is left; OUT_DIR/gpu_check.json
and gpu_check.md are rewritten after every part, so a run cut short still leaves what it did.

1. exact: the engine in fp32 on the device against the float64 reference on every tiny
   family (the suite's tests/reference.py and tests/tiny_models.py), max relative error <= 1e-4;
2. bf16: SmolLM2 in bf16 (autocast over fp32 weights, and bf16 weights) against fp32:
   Spearman over all scores and the top 10 shared, judged by the suite's thresholds;
3. oom: under torch.cuda.set_per_process_memory_fraction the row batch halves on
   out-of-memory and the scores do not change (a CPU simulates the out-of-memory errors);
4. bench: prompts/s, achieved TFLOP/s and MFU (kn_ray.engine.bench: CUDA events after a
   warm-up, FLOPs counted by torch) of the engine and of the published method on a few
   prompts: BERT-base-random fp32 and bf16, SmolLM2 bf16, llama3-8b-random bf16;
5. peak memory per device of every part.

SmolLM2 comes from --smollm2: a folder packed by benchmarks/packed_checkpoint.py (default
.gpucheck/smollm2 when present: the device machine has no network and takes 64 MiB of files,
see docs/gpu-check.md), a checkpoint directory, or `smollm2` (the cache). `--smoke` runs the
same code with tiny sizes in seconds on a CPU (tests/test_gpu_check.py), SmolLM2 replaced by a
tiny Llama that goes through the same pack and unpack.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import gc
import hashlib
import json
import math
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# this checkout's kn_ray; the suite's reference, tiny models and numerics; packed_checkpoint beside this file
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import numpy as np  # noqa: E402
import torch  # noqa: E402

import packed_checkpoint  # noqa: E402
from kn_ray.engine import Attributor, load_model, quadrature  # noqa: E402
from kn_ray.engine.bench import PEAK_TFLOPS, PeakMemory, benchmark, markdown_table, peak_tflops  # noqa: E402
from kn_ray.engine.precision import resolve_dtype  # noqa: E402
from kn_ray.engine.random_models import random_model  # noqa: E402
from kn_ray.engine.model_runner import describe  # noqa: E402
from kn_ray.interfaces.commands.bench import corpus_text, sample_prompts  # noqa: E402
from numerics import BF16_RHO_MIN, BF16_SHARED_MIN, relative_error as rel_err  # noqa: E402
from reference import float64, reference_ig  # noqa: E402
from tiny_models import CONFIGS, MASKED, cases, tiny_model  # noqa: E402

FACTS = ROOT / "tests" / "fixtures" / "pararel"  # travels with the checkout (../shared does not)
EXACT_TOL = 1e-4  # as tests/test_engine_exact.py
DEFAULT_PACKED = ROOT / ".gpucheck" / "smollm2"
TINY = dict(vocab_size=1000, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            head_dim=8, intermediate_size=64)  # --smoke: every preset shrunk to this


@dataclass(frozen=True)
class Case:
    """One bench model: engine and published rows."""

    model: str  # a random preset, or smollm2
    precision: str  # compute; weights follow (bf16 on a bf16 GPU, fp32 elsewhere)
    prompts: int  # at most; fewer if the warm-up says they do not fit budget_s
    published: int
    warmup: int
    budget_s: float


@dataclass(frozen=True)
class Plan:
    budget_s: float
    n_steps: int
    exact_steps: int
    bf16_prompts: int
    oom_prompts: int
    flop_prompts: int
    bench: tuple[Case, ...]
    sizes: dict | None = None  # config overrides of the random presets


GPU = Plan(budget_s=420, n_steps=20, exact_steps=4, bf16_prompts=16, oom_prompts=8, flop_prompts=4, bench=(
    Case("bert-base-random", "fp32", 1024, 2, 128, 45),
    Case("bert-base-random", "bf16", 2048, 2, 256, 40),
    Case("smollm2", "bf16", 1024, 2, 256, 40),
    Case("llama3-8b-random", "bf16", 512, 1, 64, 100),
))
SMOKE = Plan(budget_s=120, n_steps=3, exact_steps=3, bf16_prompts=2, oom_prompts=2, flop_prompts=1, sizes=TINY, bench=(
    Case("bert-base-random", "fp32", 4, 1, 1, 10),
    Case("bert-base-random", "bf16", 4, 1, 1, 10),
    Case("smollm2", "bf16", 4, 1, 1, 10),
    Case("llama3-8b-random", "bf16", 4, 1, 1, 10),
))
NEEDS_S = dict(exact=20, bf16=20, oom=15, bench=30)  # least time left to start a part (GPU plan; smoke: a tenth)


class Check:
    """The run: its plan, device, deadline, and the report written after every part."""

    def __init__(self, out: Path, plan: Plan, device: torch.device, smoke: bool, smollm2: str | None):
        self.out, self.plan, self.device, self.smoke = out, plan, device, smoke
        self.start = time.monotonic()
        self.work = Path(tempfile.mkdtemp(prefix="kn-gpu-check-"))
        self.smollm2_arg, self.smollm2_path, self.smollm2_label = smollm2, None, None
        self.report = dict(check="kn-ray benchmarks/gpu_check.py", smoke=smoke, budget_s=plan.budget_s,
                           started=_now(), finished=None, environment=environment(device), parts={})

    def left(self) -> float:
        return self.plan.budget_s - (time.monotonic() - self.start)

    def log(self, text: str) -> None:
        print(f"[gpu_check {time.monotonic() - self.start:6.1f}s] {text}", flush=True)

    def part(self, name: str, fn) -> None:
        need = NEEDS_S[name] / (10 if self.smoke else 1)
        if self.left() < need:
            self.report["parts"][name] = dict(status="skipped", reason=f"{self.left():.0f} s of the budget left, needs {need:.0f}")
            self.log(f"{name}: skipped (time)")
            return self.write()
        self.log(f"{name}: start ({self.left():.0f} s left)")
        result: dict = {}
        self.report["parts"][name] = result
        started = time.monotonic()
        try:
            with PeakMemory([self.device]) as memory:
                fn(result)
        except Exception as error:  # noqa: BLE001 - recorded; the other parts still run
            result.update(status="error", error=describe(error), traceback=traceback.format_exc()[-3000:])
        result.setdefault("status", "measured")
        result["seconds"] = round(time.monotonic() - started, 2)
        result["peak_memory_mb_by_device"] = {k: round(v, 1) for k, v in getattr(memory, "by_device", {}).items()}
        free_memory()
        self.log(f"{name}: {result['status']} in {result['seconds']:.1f} s")
        self.write()

    def write(self) -> None:
        self.report["elapsed_s"] = round(time.monotonic() - self.start, 2)
        _write(self.out / "gpu_check.json", json.dumps(self.report, indent=1, default=_jsonable))
        _write(self.out / "gpu_check.md", render(self.report))

    # ---- inputs -------------------------------------------------------------------------
    def prompts(self, masked: bool, n: int) -> tuple[list[str], list[str]]:
        """n PARAREL-style prompts from the shipped sample, repeated in order when it has fewer."""
        ps, ts = sample_prompts(FACTS, masked=masked, n=10_000)
        return [ps[i % len(ps)] for i in range(n)], [ts[i % len(ts)] for i in range(n)]

    def corpus(self) -> list[str]:
        if not hasattr(self, "_corpus"):
            self._corpus = corpus_text(FACTS)
        return self._corpus

    def smollm2(self) -> tuple[str, str]:
        """(loadable path or name, what it is), prepared once."""
        if self.smollm2_path is None:
            self.smollm2_path, self.smollm2_label, self.report["smollm2"] = self._prepare_smollm2()
        return self.smollm2_path, self.smollm2_label

    def _prepare_smollm2(self) -> tuple[str, str, str]:
        """(path, short label, where it came from)."""
        arg = self.smollm2_arg
        if arg is None and self.smoke:  # a tiny Llama through the same pack and unpack
            lm = random_model("llama3.2-1b-random", self.corpus(), sizes=self.plan.sizes)
            src = self.work / "tiny-llama"
            lm.model.save_pretrained(src)
            lm.tokenizer.save_pretrained(src)
            arg = str(self.work / "tiny-llama-packed")
            packed_checkpoint.pack(src, Path(arg))
        if arg is None:
            arg = str(DEFAULT_PACKED) if packed_checkpoint.is_packed(DEFAULT_PACKED) else "smollm2"
        if packed_checkpoint.is_packed(arg):
            index = json.loads((Path(arg) / packed_checkpoint.INDEX).read_text())
            path = packed_checkpoint.unpack(Path(arg), self.work / "smollm2")
            return (str(path), f"{Path(index['source']).name}, packed (step {index['step']})",
                    f"{index['source']} packed (lossy: step {index['step']} x row RMS), unpacked from {arg}")
        return arg, arg, arg

    def load(self, case: Case):
        dtype = resolve_dtype("auto", case.precision, self.device)
        if case.model == "smollm2":
            return load_model(self.smollm2()[0], device=self.device, dtype=dtype)
        return random_model(case.model, self.corpus(), device=self.device, dtype=dtype, sizes=self.plan.sizes)


# ---- parts ------------------------------------------------------------------------------
def check_exact(check: Check, result: dict) -> None:
    """Every tiny family, fp32 on the device, against the float64 reference on the CPU."""
    steps = check.plan.exact_steps
    alphas, weights = quadrature(steps, "left")
    rows = result.setdefault("rows", [])
    result.update(tolerance=EXACT_TOL, n_steps=steps, rule="left")
    for family in sorted(CONFIGS):
        model, tok = tiny_model(family, check.work)
        model64 = float64(model)
        prompts, targets = cases(family)
        got = Attributor(model.to(check.device), tok, precision="fp32").attribute(prompts, targets, n_steps=steps)
        scores = probs = 0.0
        for prompt, target, res in zip(prompts, targets, got):
            if not res.ok:
                rows.append(dict(family=family, error=res.reason, passed=False))
                break
            for layer in range(len(res.layers)):
                want, p_clean, p_zero = reference_ig(model64, family, tok, prompt, target, layer, alphas, weights,
                                                     family in MASKED)
                scores = max(scores, rel_err(res.scores[layer], want))
                probs = max(probs, abs(res.gold_prob / p_clean - 1), abs(res.baseline_prob[layer] / p_zero - 1))
        else:
            rows.append(dict(family=family, prompts=len(prompts), max_rel_err_scores=scores, max_rel_err_probs=probs,
                             passed=scores <= EXACT_TOL and probs <= EXACT_TOL))
    result["status"] = "pass" if rows and all(r["passed"] for r in rows) else "fail"


def check_bf16(check: Check, result: dict) -> None:
    """SmolLM2 attributions in bf16 against fp32 on the same prompts."""
    path, label = check.smollm2()
    prompts, targets = check.prompts(masked=False, n=check.plan.bf16_prompts)
    n_steps = check.plan.n_steps
    result.update(model=label, prompts=len(prompts), n_steps=n_steps, rho_min=BF16_RHO_MIN, shared_min=BF16_SHARED_MIN)
    lm = load_model(path, device=check.device, dtype="fp32")
    ref = Attributor(lm, precision="fp32").attribute(prompts, targets, n_steps=n_steps)
    variants = result.setdefault("variants", [])
    variants.append(compare("bf16 autocast, fp32 weights", ref,
                            Attributor(lm, precision="bf16").attribute(prompts, targets, n_steps=n_steps)))
    del lm
    free_memory()
    lm = load_model(path, device=check.device, dtype="bf16")
    variants.append(compare("bf16 weights (a GPU's default)", ref,
                            Attributor(lm, precision="bf16").attribute(prompts, targets, n_steps=n_steps)))
    if check.smoke:  # a random tiny model: the suite's thresholds are for SmolLM2
        return
    passed = all(v["min_spearman"] >= BF16_RHO_MIN and v["min_top10_shared"] >= BF16_SHARED_MIN for v in variants)
    result["status"] = "pass" if passed else "fail"


def compare(name: str, ref, got) -> dict:
    """Per prompt: Spearman over all scores, top 10 shared, relative L2 error, gold P ratio."""
    rho, shared, l2, p = [], [], [], []
    for a, b in zip(ref, got):
        if not (a.ok and b.ok):
            continue
        x, y = a.scores.ravel(), b.scores.ravel()
        rho.append(spearman(x, y))
        shared.append(len({n[:2] for n in a.top_neurons(10)} & {n[:2] for n in b.top_neurons(10)}))
        l2.append(float(np.linalg.norm(x - y) / np.linalg.norm(x)))
        p.append(b.gold_prob / a.gold_prob)
    return dict(variant=name, prompts=len(rho), min_spearman=min(rho, default=math.nan),
                mean_spearman=float(np.mean(rho)) if rho else math.nan, min_top10_shared=min(shared, default=0),
                mean_top10_shared=float(np.mean(shared)) if shared else math.nan,
                max_rel_l2=max(l2, default=math.nan), gold_prob_ratio=[min(p, default=math.nan), max(p, default=math.nan)])


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    """Spearman's rho: Pearson's r of average ranks (ties share their mean rank)."""
    rx, ry = _ranks(x), _ranks(y)
    return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(x: np.ndarray) -> np.ndarray:
    _, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    ends = np.cumsum(counts)
    return (ends - (counts - 1) / 2)[inverse]


def check_oom(check: Check, result: dict) -> None:
    """Out-of-memory halves the row batch; the scores equal an unconstrained run's."""
    path, label = check.smollm2()
    prompts, targets = check.prompts(masked=False, n=check.plan.oom_prompts)
    lm = load_model(path, device=check.device, dtype="fp32")
    want = Attributor(lm, precision="fp32").attribute(prompts, targets, n_steps=check.plan.n_steps)
    attr = Attributor(lm, precision="fp32", max_batch_tokens=256)
    rows, backoffs, real_rows, real_back_off = [], [], attr._rows, attr._back_off

    def counted_rows(batch, clean, layer, pi, alpha, baseline):
        rows.append(len(pi))
        if check.device.type != "cuda" and len(pi) > 2:
            raise torch.OutOfMemoryError("CPU out of memory (simulated: a CPU has no per-process cap)")
        return real_rows(batch, clean, layer, pi, alpha, baseline)

    def counted_back_off():
        backoffs.append(attr.max_batch_tokens)
        real_back_off()

    attr._rows, attr._back_off = counted_rows, counted_back_off
    with memory_cap(check.device, headroom_mb=64) as cap, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = attr.attribute(prompts, targets, n_steps=check.plan.n_steps)
    worst = max((rel_err(g.scores, w.scores) for g, w in zip(got, want) if g.ok and w.ok), default=math.inf)
    result.update(model=label, mode="cuda memory fraction" if check.device.type == "cuda" else "simulated (CPU)",
                  cap_mb=cap.get("cap_mb"), fraction=cap.get("fraction"), back_offs=len(backoffs),
                  first_rows=rows[0] if rows else 0, final_rows=min(rows, default=0), final_batch_tokens=attr.max_batch_tokens,
                  prompts_ok=sum(g.ok for g in got), prompts=len(got), max_rel_err_scores=worst,
                  warnings=[str(w.message)[:300] for w in caught][:5],
                  errors=[g.reason for g in got if not g.ok][:3])
    passed = backoffs and all(g.ok for g in got) and worst <= EXACT_TOL
    result["status"] = "pass" if passed else "fail"


@contextlib.contextmanager
def memory_cap(device: torch.device, headroom_mb: int):
    """On a GPU, cap this process at what it holds now plus `headroom_mb`; restored on exit."""
    info: dict = {}
    if device.type != "cuda":
        yield info
        return
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    total = torch.cuda.get_device_properties(device).total_memory
    cap = torch.cuda.memory_reserved(device) + headroom_mb * 2**20
    info.update(cap_mb=round(cap / 2**20, 1), fraction=cap / total)
    torch.cuda.set_per_process_memory_fraction(cap / total, device)
    try:
        yield info
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, device)
        torch.cuda.empty_cache()


def check_bench(check: Check, result: dict) -> None:
    """Engine and published rows per case; rows are written as each case finishes."""
    rows = result.setdefault("rows", [])
    result.update(n_steps=check.plan.n_steps, skipped=[])
    for case in check.plan.bench:
        reserve = 5 if check.smoke else 20  # for writing up and the cases' model builds
        if check.left() < reserve + (1 if check.smoke else 15):
            result["skipped"].append(dict(asdict(case), reason="time"))
            continue
        label = case.model + (" (tiny sizes)" if check.smoke else "")
        check.log(f"bench {label} {case.precision}")
        lm = check.load(case)
        if case.model == "smollm2":
            label = check.smollm2()[1]
        prompts, targets = check.prompts(masked=lm.adapter.masked, n=case.prompts)
        budget = min(case.budget_s, check.left() - reserve)
        for row in benchmark(lm, prompts, targets, n_steps=check.plan.n_steps, precision=case.precision,
                             published_prompts=case.published, name=label, warmup_prompts=case.warmup,
                             flop_prompts=check.plan.flop_prompts, budget_s=budget):
            rows.append(row.as_dict())
        del lm
        free_memory()
        check.write()


# ---- report -------------------------------------------------------------------------------
def environment(device: torch.device) -> dict:
    import transformers

    env = dict(python=platform.python_version(), torch=torch.__version__, transformers=transformers.__version__,
               device=str(device), float32_matmul_precision=torch.get_float32_matmul_precision(),
               commit=_git_commit(), sources_sha256=sources_sha256(), peak_table=[dict(match=k, tflops=v) for k, v in PEAK_TFLOPS])
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", multiprocessors=props.multi_processor_count,
                   memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   peak_tflops_bf16=peak_tflops(device, "bf16"), peak_tflops_fp32=peak_tflops(device, "fp32"))
    else:
        env.update(cpu=platform.processor() or platform.machine())
    return env


def render(report: dict) -> str:
    """The markdown summary: one line per part, then each part's table."""
    env, parts = report["environment"], report["parts"]
    what = env.get("gpu") or env.get("cpu")
    lines = [f"# kn-ray GPU check{' (smoke: tiny sizes, the numbers mean nothing)' if report['smoke'] else ''}", "",
             f"{what} ({env['device']}); torch {env['torch']}, transformers {env['transformers']}, Python {env['python']}; "
             f"commit {env['commit']} (sources {env['sources_sha256']}); started {report['started']}, {report['elapsed_s']:.0f} s of {report['budget_s']:.0f}.",
             "", "| part | status | seconds | peak MB by device |", "|---|---|---|---|"]
    for name, part in parts.items():
        peak = " ".join(f"{k}:{v:.0f}" for k, v in part.get("peak_memory_mb_by_device", {}).items())
        lines.append(f"| {name} | {part.get('status', 'running')} | {part.get('seconds', '-')} | {peak} |")
    for name, part in parts.items():
        if part.get("status") == "error":
            lines += ["", f"**{name}: error** `{part['error']}`"]
    if rows := parts.get("exact", {}).get("rows"):
        lines += ["", f"## Exactness: fp32 on the device vs the float64 reference (tolerance {EXACT_TOL:g})", "",
                  "| family | max rel. err scores | max rel. err P | pass |", "|---|---|---|---|"]
        lines += [f"| {r['family']} | {r.get('max_rel_err_scores', math.nan):.2e} | {r.get('max_rel_err_probs', math.nan):.2e} "
                  f"| {r['passed']} |" for r in rows]
    if variants := parts.get("bf16", {}).get("variants"):
        b = parts["bf16"]
        lines += ["", f"## bf16 vs fp32 on {b['model']} ({b['prompts']} prompts, {b['n_steps']} steps; "
                  f"the suite asks Spearman >= {b['rho_min']}, >= {b['shared_min']} of the top 10)", "",
                  "| variant | prompts | min / mean Spearman | min / mean top-10 shared | max rel. L2 | gold P ratio |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {v['variant']} | {v['prompts']} | {v['min_spearman']:.4f} / {v['mean_spearman']:.4f} | "
                  f"{v['min_top10_shared']} / {v['mean_top10_shared']:.1f} | {v['max_rel_l2']:.3f} | "
                  f"{v['gold_prob_ratio'][0]:.3f}-{v['gold_prob_ratio'][1]:.3f} |" for v in variants]
    if (o := parts.get("oom", {})).get("mode"):
        lines += ["", f"## Out-of-memory back-off ({o['mode']})", "",
                  f"Cap {o['cap_mb'] or '(none: simulated)'} MB; {o['back_offs']} back-offs, rows per pass {o['first_rows']} -> {o['final_rows']}; "
                  f"{o['prompts_ok']}/{o['prompts']} prompts ok; max rel. err vs unconstrained {o['max_rel_err_scores']:.2e}."]
    if rows := parts.get("bench", {}).get("rows"):
        from kn_ray.engine.bench import BenchRow

        lines += ["", f"## Bench ({parts['bench']['n_steps']} steps; MFU against the datasheet peak, "
                  "kn_ray.engine.bench.PEAK_TFLOPS)", "", markdown_table([BenchRow(**r) for r in rows])]
        if skipped := parts["bench"].get("skipped"):
            lines.append("\nNot run (time): " + ", ".join(f"{s['model']} {s['precision']}" for s in skipped))
    return "\n".join(lines) + "\n"


def free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _git_commit() -> str:
    try:
        out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def sources_sha256() -> str:
    """A hash of kn_ray's and benchmarks' Python sources: ties a report to a tree where the
    device machine has no .git (compare: python -c "import sys; sys.path[:0] = ['benchmarks'];
    import gpu_check; print(gpu_check.sources_sha256())")."""
    digest = hashlib.sha256()
    for path in sorted([*ROOT.glob("kn_ray/**/*.py"), *ROOT.glob("benchmarks/*.py")]):
        digest.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _jsonable(value):
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    return str(value)


def _write(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu_check.json and gpu_check.md")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, seconds; runs on a CPU")
    parser.add_argument("--smollm2", default=None, help=f"packed folder, checkpoint or name (default: {DEFAULT_PACKED.relative_to(ROOT)} "
                        "if packed there, else smollm2 from the cache)")
    parser.add_argument("--budget-s", type=float, default=None, help="time budget in seconds (default 420; smoke 120)")
    parser.add_argument("--parts", default="exact,bf16,oom,bench", help="comma-separated subset of exact,bf16,oom,bench")
    parser.add_argument("--device", default=None, help="default: cuda when present")
    args = parser.parse_args(argv)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type != "cuda" and not args.smoke:
        print("error: no CUDA device here; on a CPU run with --smoke", file=sys.stderr)
        return 2
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if unknown := set(parts) - set(NEEDS_S):
        print(f"error: unknown parts {sorted(unknown)}; known: {', '.join(NEEDS_S)}", file=sys.stderr)
        return 2
    plan = SMOKE if args.smoke else GPU
    if args.budget_s is not None:
        plan = Plan(**{**plan.__dict__, "budget_s": args.budget_s})
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    if args.smoke:  # tiny work: more threads only add synchronisation (and on a shared CPU, waiting)
        torch.set_num_threads(1)
    check = Check(args.out, plan, device, args.smoke, args.smollm2)
    check.log(f"{check.report['environment'].get('gpu', device)}; budget {plan.budget_s:.0f} s; writing {args.out}")
    check.write()
    try:
        for name in parts:
            check.part(name, lambda result, name=name: PARTS[name](check, result))
    finally:
        check.report["finished"] = _now()
        check.write()
        shutil.rmtree(check.work, ignore_errors=True)
    print(render(check.report), flush=True)
    bad = [n for n, p in check.report["parts"].items() if p["status"] in ("error", "fail")]
    return 1 if bad else 0


PARTS = dict(exact=check_exact, bf16=check_bf16, oom=check_oom, bench=check_bench)

if __name__ == "__main__":
    raise SystemExit(main())
