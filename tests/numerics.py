"""One way to compare two floating-point computations of the same quantity.

Two computations of the same numbers differ in rounding whenever they add terms in another
order: another thread count or batch split (more row chunks), another kernel (AVX2, AVX-512,
AMX, a GPU), an offloaded model (its blocks run one by one), a Ray actor against a local run,
S3 against a local file. The error of a sum of K terms is bounded by ~eps * sqrt(K) times the
size of the terms (random-walk rounding), and the terms are as large as the biggest values of
the result, not as large as each element: an attribution score near zero is the difference of
large products and carries the absolute error of its large neighbours. So the tolerance is one
number for the whole array,

    max |actual - expected|  <=  C * eps(dtype) * sqrt(K) * scale

- scale: max(|actual|, |expected|) over the array by default; 1 for quantities whose error is
  absolute (a relative change after/before - 1, a log probability, a log perplexity: the
  logits' absolute error passes through unchanged);
- K = 2**16: the longest reduction in the computations we compare (the softmax over a 49,152-token
  vocabulary; hidden and FFN sizes are below it), so sqrt(K) * eps = 3.1e-5 in fp32;
- C = 1.

Measured on an AMD EPYC Zen 4 (AVX-512, AVX512-BF16), with KN_NUMERICS_LOG set: over every
`numerics` test at the machine's defaults, and over the engine and offload tests under
`make test-numerics` (1 and 2 threads, ATEN_CPU_CAPABILITY default/avx2/avx512, 7-token and
default batch splits), the largest max|a - b| / scale of any comparison was 4.3e-6 (a layer
subset in 5-token row chunks against the full run, llama), 7x below the tolerance of 3.1e-5;
offloaded models against resident ones reached 3.4e-6 (the first report's Zen 4 failure was
1.4e-6 of the largest score). `make test-numerics` prints this number for the machine it runs
on; Intel and AVX2-only EPYC were not measured in this session. A real error is far above it: one
quadrature node too many or too few moves scores by ~1/n_steps (5e-2), a wrong layer or position
by O(1).

No element-wise relative tolerance anywhere: elements near zero would make it fail on ordinary
rounding (the Zen 4 failure: -3.1113e-05 against -3.1136e-05, 7e-4 apart relatively, 1.4e-6 of
the array's largest score).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

# bf16 against fp32 is not rounding of one computation but a coarser one (8 mantissa bits): it
# is judged by what the scores are used for, the neurons' ranking: Spearman over all scores,
# and how many of the top 10 both share (tests/test_smollm2.py, benchmarks/gpu_check.py).
BF16_RHO_MIN, BF16_SHARED_MIN = 0.98, 8

EPS = {"float64": 2.0**-52, "float32": 2.0**-23, "float16": 2.0**-10, "bfloat16": 2.0**-7}
REDUCTION = 2**16
C = 1.0


def tolerance(scale: float, dtype: str = "float32", reduction: int = REDUCTION) -> float:
    """The absolute tolerance for two `dtype` computations whose values are of size `scale`."""
    return C * EPS[dtype] * math.sqrt(reduction) * scale


def relative_error(got, want) -> float:
    """Norm-wise (max) relative error: max|got - want| / max|want| (used against float64 references)."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    return float(np.abs(got - want).max() / np.abs(want).max())


def assert_same_numbers(actual, expected, *, scale: float | None = None, dtype: str = "float32",
                        reduction: int = REDUCTION, what: str = "") -> None:
    """Assert two computations of the same quantity agree to rounding (see the module docstring).

    `scale` defaults to the largest magnitude in either array; pass 1.0 for quantities with an
    absolute error (relative changes, log probabilities); `reduction=1` for a value merely
    rounded to `dtype` (stored as float16, say). NaNs must sit at the same places.
    """
    a, b = _array(actual), _array(expected)
    assert a.shape == b.shape, f"{what}: shapes {a.shape} and {b.shape}"
    nan = np.isnan(a)
    assert np.array_equal(nan, np.isnan(b)), f"{what}: NaNs at different places"
    a, b = a[~nan], b[~nan]
    if a.size == 0:
        return
    scale = float(max(np.abs(a).max(), np.abs(b).max())) if scale is None else float(scale)
    diff = np.abs(a - b)
    worst = int(diff.argmax())
    err, tol = float(diff[worst]), tolerance(scale, dtype, reduction)
    _log(what, err, scale, dtype, reduction)
    assert err <= tol, (
        f"{what}: max|actual - expected| = {err:.3g} > {tol:.3g} (= {C} * eps({dtype}) * sqrt({reduction}) * {scale:.3g}); "
        f"worst element: {a[worst]!r} vs {b[worst]!r}"
    )


def _array(x) -> np.ndarray:
    """float64 numpy of an array, a pandas column or a torch tensor (detached, on the host)."""
    if hasattr(x, "detach"):
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def _log(what: str, err: float, scale: float, dtype: str, reduction: int) -> None:
    """With KN_NUMERICS_LOG=FILE, append each comparison's error (how the docstring's numbers were measured)."""
    path = os.environ.get("KN_NUMERICS_LOG")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps({"test": os.environ.get("PYTEST_CURRENT_TEST", ""), "what": what,
                                "dtype": dtype, "reduction": reduction,
                                "ratio": err / scale if scale else 0.0}) + "\n")


def assert_same_frames(got, want, *, absolute: tuple[str, ...] = (), what: str = "") -> None:
    """Two tables of the same rows: equal columns and non-float values; each float column within
    the tolerance of its own scale (`absolute` columns: scale 1, see `assert_same_numbers`)."""
    import pandas as pd

    assert list(got.columns) == list(want.columns) and len(got) == len(want), (list(got.columns), list(want.columns))
    for column in got.columns:
        a, b = got[column], want[column]
        if pd.api.types.is_float_dtype(a) and pd.api.types.is_float_dtype(b):
            assert_same_numbers(a, b, scale=1.0 if column in absolute else None, what=f"{what}{column}")
        elif len(a) and isinstance(a.iloc[0], (list, np.ndarray)) and np.asarray(a.iloc[0]).dtype.kind == "f":
            assert_same_numbers(np.stack(a.to_numpy()), np.stack(b.to_numpy()), what=f"{what}{column}")
        else:
            pd.testing.assert_series_equal(a.reset_index(drop=True), b.reset_index(drop=True), check_names=False)


def assert_same_edit_rows(got, want) -> None:
    """Edit rows of two runs: identical keys, flags and counts; probabilities within the tolerance of
    their column; relative changes as log ratios and perplexities as logs (absolute errors) at scale 1."""
    got, want = got.copy(), want.copy()
    for frame in (got, want):
        if "rel_change" in frame:  # P_after / P_before - 1 carries the ratio's rounding: compare log ratios
            frame["rel_change"] = np.log1p(frame["rel_change"].astype(float))
        for column in ("ppl_before", "ppl_after"):
            if column in frame:
                frame[column] = np.log(frame[column].astype(float))
        if "value" in frame and "metric" in frame:  # metric rows: rates are counts, perplexities as above
            ppl = frame.metric.fillna("").str.contains("ppl")
            frame["value"] = np.where(ppl, np.log(frame["value"].astype(float)), frame["value"].astype(float))
    absolute = ("rel_change", "ppl_before", "ppl_after", "value")
    assert_same_frames(got, want, absolute=absolute, what="edits.")
