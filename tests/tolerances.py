"""Tolerances for comparing probabilities computed by two fp32 runs (and the comparisons built on them).

Two runs of the same fp32 model can round differently: another thread count splits the
reductions differently, another batch shape or CPU (AVX2 vs AVX-512) picks another kernel. The
logits then differ by a few units in the last place, ~1e-6 at the logit sizes of these models,
and a softmax turns that into a *relative* error of about the same size in every probability,
and an absolute error in log P (a 1-thread and a 2-thread run of the edit tests gave
relative changes of -0.0081236 and -0.0081217). So:

- a probability P in [0, 1] moves by a few 1e-6 x P at most: PROB_ATOL = 1e-5 holds for any P;
- a relative change (after - before) / before = after / before - 1 inherits the relative errors
  of both probabilities as an absolute error, ~2e-6 however small the change is:
  CHANGE_ATOL = 2e-5 leaves 10x room and is still 25x below the smallest effect the edit tests
  measure on tiny models (|rel_change| >= 5e-4); a rtol on the small change itself is not a
  tolerance on anything the numerics bound;
- a perplexity exp(-mean log P) moves by the same relative amount: compare log perplexity
  with LOG_ATOL = 2e-5.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

PROB_ATOL = 1e-5
CHANGE_ATOL = 2e-5
LOG_ATOL = 2e-5

PROB_COLUMNS = ("prob_before", "prob_after", "new_prob_before", "new_prob_after")
PPL_COLUMNS = ("ppl_before", "ppl_after")


def assert_same_edit_rows(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Edit rows of two runs: identical keys, flags and counts; numbers within the tolerances above."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    numeric = {c: PROB_ATOL for c in PROB_COLUMNS} | {"rel_change": CHANGE_ATOL}
    for column in got.columns:
        a, b = got[column], want[column]
        if column in numeric:
            np.testing.assert_allclose(a.astype(float), b.astype(float), rtol=0, atol=numeric[column], err_msg=column)
        elif column in PPL_COLUMNS:
            np.testing.assert_allclose(np.log(a.astype(float)), np.log(b.astype(float)), rtol=0, atol=LOG_ATOL,
                                       err_msg=column)
        elif column == "value":  # metric rows: rates are counts over prompts, perplexities as above
            ppl = got.metric.fillna("").str.contains("ppl")
            np.testing.assert_allclose(np.log(a[ppl].astype(float)), np.log(b[ppl].astype(float)), rtol=0,
                                       atol=LOG_ATOL, err_msg=column)
            pd.testing.assert_series_equal(a[~ppl], b[~ppl])
        else:
            pd.testing.assert_series_equal(a, b)
