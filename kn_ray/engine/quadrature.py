"""Quadrature rules for the integrated-gradients path integral over alpha in [0, 1].

A rule is (alphas, weights) in float64 with weights summing to 1, so that
score = (a - b) * sum_k w_k * dP/dx(b + alpha_k (a - b)).

* `left` with 20 steps is the authors' released code (the paper's m = 20).
* `right`, `midpoint`, `trapezoid`: the other Riemann rules (error O(1/m) or O(1/m^2)).
* `gausslegendre`: the m-node Gauss-Legendre rule (numpy's `leggauss`, mapped to [0, 1]),
  exact for polynomials of degree 2m - 1; captum's default. Its nodes never include
  alpha = 0, so the engine adds one zero-weight row there for P(baseline).

`romberg_weights` serves adaptive steps (`n_steps="auto"`): the trapezoid rule on 2^k
intervals reuses every node of the rule on 2^(k-1) intervals, and Richardson extrapolation
of those nested sums (Romberg) gives a high-order rule from the same evaluations.
"""

from __future__ import annotations

import numpy as np
import torch

from kn_ray.choices import AUTO, RULE, RULES  # noqa: F401 - AUTO: n_steps="auto", adaptive steps


def quadrature(n_steps: int, rule: str = RULE) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of `rule` with `n_steps` steps (nodes), float64; weights sum to 1."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, (int, np.integer)) or n_steps < 1:
        raise ValueError(f"n_steps must be an int >= 1, got {n_steps!r}")
    m = int(n_steps)
    if rule == "gausslegendre":
        x, w = np.polynomial.legendre.leggauss(m)
        return torch.from_numpy((x + 1) / 2), torch.from_numpy(w / 2)
    k = torch.arange(m + (rule == "trapezoid"), dtype=torch.float64)
    if rule == "left":
        alphas = k / m
    elif rule == "right":
        alphas = (k + 1) / m
    elif rule == "midpoint":
        alphas = (k + 0.5) / m
    elif rule == "trapezoid":
        alphas = k / m
    else:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    weights = torch.full_like(alphas, 1.0 / m)
    if rule == "trapezoid":
        weights[0] = weights[-1] = 0.5 / m
    return alphas, weights




def nested_nodes(level: int) -> torch.Tensor:
    """The alphas that the trapezoid rule on 2^level intervals adds to the one on 2^(level-1)
    intervals (level 0: both ends, 0 and 1)."""
    if level == 0:
        return torch.tensor([0.0, 1.0], dtype=torch.float64)
    n = 2**level
    return torch.arange(1, n, 2, dtype=torch.float64) / n


def romberg_weights(level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) of the Romberg rule R(level, level) over the 2^level + 1 nested nodes.

    The extrapolation is linear in the integrand, so it is a fixed rule on those nodes; its
    weights are positive (the tests check it against a direct Romberg table).
    """
    alphas = torch.cat([nested_nodes(j) for j in range(level + 1)])
    # T[j] as weight vectors over `alphas`: the trapezoid rule on 2^j intervals
    table = []
    for j in range(level + 1):
        n = 2**j
        grid = np.round(alphas.numpy() * n, 9)
        on = np.isclose(grid, np.round(grid))
        w = np.where(on, 1.0 / n, 0.0)
        w[np.isclose(alphas.numpy(), 0.0) | np.isclose(alphas.numpy(), 1.0)] = 0.5 / n
        table.append(w)
    for k in range(1, level + 1):  # R(j, k) = R(j, k-1) + (R(j, k-1) - R(j-1, k-1)) / (4^k - 1)
        table = [table[j] + (table[j] - table[j - 1]) / (4**k - 1) for j in range(1, len(table))]
    return alphas, torch.from_numpy(table[-1])
