"""Riemann rules for the integrated-gradients path integral over alpha in [0, 1]."""

from __future__ import annotations

import torch

METHODS = ("left", "right", "midpoint", "trapezoid")


def riemann(n_steps: int, method: str = "left") -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas, weights) in float64; weights sum to 1, so score = a * sum_k w_k * dP/dx(alpha_k * a).

    `left` is the authors' released code: alpha = 0, 1/m, ..., (m-1)/m.
    """
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    m = n_steps
    k = torch.arange(m + (method == "trapezoid"), dtype=torch.float64)
    if method == "left":
        alphas = k / m
    elif method == "right":
        alphas = (k + 1) / m
    elif method == "midpoint":
        alphas = (k + 0.5) / m
    elif method == "trapezoid":
        alphas = k / m
    else:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    weights = torch.full_like(alphas, 1.0 / m)
    if method == "trapezoid":
        weights[0] = weights[-1] = 0.5 / m
    return alphas, weights
