"""How many knowledge neurons pairs of facts share, within vs across relations (the paper's Table 2).

Pairs sharing a neuron can number in the billions (a neuron common to 40k facts alone makes
800M), so nothing here enumerates them at scale:

* mean shared neurons is exact from counts: a neuron held by c facts, c_r of them in
  relation r, adds C(c_r, 2) to the intra pairs' total and C(c, 2) - sum_r C(c_r, 2) to the
  inter pairs' total;
* mean Jaccard is exact over all pairs while there are at most `max_pairs` of them, and
  otherwise estimated on `max_pairs` pairs drawn uniformly (seeded) per kind.

The population is the facts with at least one knowledge neuron of the method.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

MAX_PAIRS = 200_000


def _choose2(n) -> np.ndarray:
    n = np.asarray(n, dtype=np.float64)
    return n * (n - 1) / 2


def _shared_totals(kn: pd.DataFrame) -> dict[str, float]:
    per_relation = kn.groupby(["layer", "neuron", "relation"]).size()
    intra = _choose2(per_relation).sum()
    total = _choose2(per_relation.groupby(level=["layer", "neuron"]).sum()).sum()
    return {"intra": intra, "inter": total - intra}


def _all_pairs(relation: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    first, second = np.triu_indices(relation.size, 1)
    same = relation[first] == relation[second]
    return {"intra": (first[same], second[same]), "inter": (first[~same], second[~same])}


def _sampled_pairs(rng, relation: np.ndarray, count: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Uniform unordered pairs of distinct facts, within and across relations (facts sorted by relation)."""
    codes, start, sizes = np.unique(relation, return_index=True, return_counts=True)
    weights = _choose2(sizes)
    pairs = {}
    if weights.sum() > 0:
        block = rng.choice(codes.size, count, p=weights / weights.sum())
        i = rng.integers(0, sizes[block])
        j = rng.integers(0, sizes[block] - 1)
        pairs["intra"] = (start[block] + i, start[block] + j + (j >= i))
    if codes.size > 1:
        first, second = np.empty(0, np.int64), np.empty(0, np.int64)
        while first.size < count:
            a, b = rng.integers(0, relation.size, (2, 2 * count))
            keep = relation[a] != relation[b]
            first, second = np.concatenate([first, a[keep]]), np.concatenate([second, b[keep]])
        pairs["inter"] = (first[:count], second[:count])
    return pairs


def _mean_jaccard(kn: pd.DataFrame, sizes: np.ndarray, first: np.ndarray, second: np.ndarray) -> float:
    if first.size == 0:
        return float("nan")
    pairs = pd.DataFrame({"pair": np.arange(first.size), "a": first, "b": second})
    cells = kn[["fact", "layer", "neuron"]]
    left = pairs.merge(cells, left_on="a", right_on="fact")[["pair", "b", "layer", "neuron"]]
    both = left.merge(cells, left_on=["b", "layer", "neuron"], right_on=["fact", "layer", "neuron"])
    shared = np.bincount(both.pair.to_numpy(), minlength=first.size)
    return float(np.mean(shared / (sizes[first] + sizes[second] - shared)))


def overlap_of(kn: pd.DataFrame, max_pairs: int = MAX_PAIRS, seed: int = 0) -> pd.DataFrame:
    """Rows (pairs, n_facts, n_pairs, mean_shared, mean_jaccard, jaccard_pairs) for one method's
    knowledge neurons (columns fact_id, relation, layer, neuron)."""
    facts = kn.groupby("fact_id").agg(relation=("relation", "first"), size=("layer", "size")).reset_index()
    facts = facts.sort_values(["relation", "fact_id"], ignore_index=True)
    kn = kn.merge(facts.reset_index()[["index", "fact_id"]].rename(columns={"index": "fact"}), on="fact_id")
    relation, sizes = facts.relation.to_numpy(), facts["size"].to_numpy()
    per_relation = facts.groupby("relation").size().to_numpy()
    n_pairs = {"intra": _choose2(per_relation).sum(), "inter": _choose2(len(facts)) - _choose2(per_relation).sum()}
    exact = _choose2(len(facts)) <= max_pairs
    pairs = _all_pairs(relation) if exact else _sampled_pairs(np.random.default_rng(seed), relation, max_pairs)
    shared = _shared_totals(kn)
    rows = []
    for kind in ("intra", "inter"):
        first, second = pairs.get(kind, (np.empty(0, np.int64), np.empty(0, np.int64)))
        rows.append({"pairs": kind, "n_facts": len(facts), "n_pairs": int(n_pairs[kind]),
                     "mean_shared": shared[kind] / n_pairs[kind] if n_pairs[kind] else float("nan"),
                     "mean_jaccard": _mean_jaccard(kn, sizes, first, second), "jaccard_pairs": int(first.size)})
    return pd.DataFrame(rows)
