"""Adaptive steps (`n_steps="auto"`): per prompt and layer, only as many nodes as the integral needs.

The trapezoid rule on 2^j intervals reuses every node of the rule on 2^(j-1) intervals, so
doubling it costs only the new midpoints. Romberg (Richardson) extrapolation of those nested
sums is a high-order rule on the same nodes (`quadrature.romberg_weights` is its fixed-rule
form). After each doubling, a (prompt, layer) whose completeness residual

    |sum_i score_i - (P - P(layer at baseline))| <= tolerance * max(|P - P(baseline)|, FLOOR * P)

stops; the others go on, up to 2^MAX_LEVEL + 1 nodes. The FLOOR keeps a layer that barely
moves P (where the residual is all rounding) from running to the cap.
"""

from __future__ import annotations

import torch

from .quadrature import nested_nodes

FIRST_LEVEL = 2  # the first check: 5 nodes (Boole's rule); 3-node Simpson can pass by luck
MAX_LEVEL = 6  # at most 65 nodes per (prompt, layer)
FLOOR = 0.01


def integrate_adaptive(attributor, batch, clean, layer: int, baseline: float, tolerance: float):
    """(grad_sum [B, F], P at baseline [B], nodes used [B]) for every prompt of the batch at `layer`.

    grad_sum is the Romberg estimate of integral_0^1 dP/dx(b + alpha (a - b)) dalpha, as the
    fixed rules' sum_k w_k dP/dx(alpha_k) is.
    """
    B, dev = batch.size, attributor.device
    a, gold = clean.acts[layer], clean.gold_prob.float()
    todo = torch.arange(B, device=dev)
    used = torch.zeros(B, dtype=torch.int32)
    estimate = torch.zeros(B, attributor._width, device=dev)
    p_zero = torch.zeros(B, device=dev)
    row: list[torch.Tensor] = []  # the Romberg table's last row, R(j-1, 0..j-1), for all B prompts
    for level in range(MAX_LEVEL + 1):
        nodes = nested_nodes(level)
        h = 0.5 if level == 0 else 0.5**level  # T_0 = (f(0) + f(1)) / 2; T_j = T_(j-1) / 2 + h * sum(new)
        alphas, weights = nodes.float().to(dev), torch.full_like(nodes, h).float().to(dev)
        new_sum, p0 = attributor._integrate(batch, clean, layer, alphas, weights, 0 if level == 0 else -1, baseline,
                                            prompts=todo)
        if level == 0:
            p_zero = p0
        trapezoid = new_sum if level == 0 else row[0] / 2 + new_sum
        new_row = [trapezoid]
        for k in range(1, level + 1):
            new_row.append(new_row[k - 1] + (new_row[k - 1] - row[k - 1]) / (4**k - 1))
        row = new_row
        used[todo.cpu()] = 2**level + 1
        estimate[todo] = row[-1][todo]
        if level < FIRST_LEVEL:
            continue
        change = gold[todo] - p_zero[todo]
        residual = (((a[todo] - baseline) * row[-1][todo]).sum(-1) - change).abs()
        bound = tolerance * torch.maximum(change.abs(), FLOOR * gold[todo])
        todo = todo[residual > bound]
        if len(todo) == 0:
            break
    return estimate, p_zero, used
