"""`make test-numerics`: the comparison-heavy tests (marker `numerics`) under other rounding.

Two computations of the same numbers must agree to the tolerance of tests/numerics.py on every
CPU. `make test` runs them once as the machine is (all threads, the CPU's best kernels, the
engine's default batch split). This reruns them so that every level of each factor is seen:
thread counts (1, 2), kernel ISAs (ATEN_CPU_CAPABILITY default, avx2, avx512 where the CPU has
it) and batch splits (the default row-token budget, and 7 tokens: many row chunks), and prints
the largest error of any comparison as a fraction of its scale, beside the tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from numerics import EPS, REDUCTION, tolerance  # noqa: E402

# Every level of every factor at least once, in three runs (with `make test`'s: four).
CONFIGS = [(1, "avx2", "small"), (2, "avx512", "small"), (1, "default", "large")]
SMALL_TOKENS = 7


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def run(threads: int, isa: str, tokens: str, log: Path, extra: list[str]) -> int:
    env = dict(os.environ, KN_TEST_THREADS=str(threads), KN_NUMERICS_LOG=str(log))
    env.pop("ATEN_CPU_CAPABILITY", None)
    if isa != "default":
        env["ATEN_CPU_CAPABILITY"] = isa
    if tokens == "small":
        env["KN_TEST_MAX_BATCH_TOKENS"] = str(SMALL_TOKENS)
    print(f"== threads={threads} ATEN_CPU_CAPABILITY={isa} max_batch_tokens={tokens}", flush=True)
    return subprocess.call([sys.executable, "-m", "pytest", "-m", "numerics", "-q", "-p", "no:cacheprovider", *extra],
                           env=env)


def main(argv: list[str]) -> int:
    flags = cpu_flags()
    failed, worst = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for threads, isa, tokens in CONFIGS:
            if isa == "avx512" and "avx512f" not in flags:
                print(f"== skipping ATEN_CPU_CAPABILITY=avx512: this CPU has no AVX-512", flush=True)
                continue
            log = Path(tmp) / f"{threads}-{isa}-{tokens}.jsonl"
            if run(threads, isa, tokens, log, argv):
                failed.append((threads, isa, tokens))
            rows = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
            fp32 = [r for r in rows if r.get("dtype", "float32") == "float32" and r["reduction"] == REDUCTION]
            if fp32:
                top = max(fp32, key=lambda r: r["ratio"])
                worst.append((top["ratio"], threads, isa, tokens, top["test"], top["what"]))
    print(f"\nfp32 tolerance: {tolerance(1.0):.2e} of the scale (eps {EPS['float32']:.2e} x sqrt({REDUCTION}))")
    for ratio, threads, isa, tokens, test, what in sorted(worst, reverse=True):
        print(f"largest error {ratio:.2e} of the scale ({ratio / tolerance(1.0):.2f} of the tolerance): "
              f"threads={threads} isa={isa} tokens={tokens}: {test.split(' ')[0]} [{what}]")
    if failed:
        print(f"numerics matrix: {len(failed)} configuration(s) failed: {failed}")
        return 1
    print("numerics matrix: every configuration passed")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
