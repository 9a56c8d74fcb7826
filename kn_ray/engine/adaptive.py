"""Adaptive steps (`n_steps="auto"`): per prompt and layer, only as many nodes as the integral needs.

The trapezoid rule on 2^j intervals reuses every node of the rule on 2^(j-1) intervals, so
doubling it costs only the new midpoints. Romberg (Richardson) extrapolation of those nested
sums is a high-order rule on the same nodes (`quadrature.romberg_weights` is its fixed-rule
form). After each doubling, a (prompt, layer) whose completeness residual

    |sum_i score_i - (P - P(layer at baseline))| <= tolerance * max(|P - P(baseline)|, FLOOR * P)

stops; the others go on, up to 2^MAX_LEVEL + 1 nodes. The FLOOR keeps a layer that barely
moves P (where the residual is all rounding) from running to the cap.

Time follows evaluations: the nodes up to FIRST_LEVEL are one pass per layer (like a fixed
rule), and each later doubling is ONE batched pass over every (prompt, layer) of the batch that
has not converged yet, whatever its layer (`Attributor._integrate_rows` starts it at the lowest
of their layers).
"""

from __future__ import annotations

import torch

from .quadrature import nested_nodes

FIRST_LEVEL = 2  # the first check: 5 nodes (Boole's rule); 3-node Simpson can pass by luck
MAX_LEVEL = 6  # at most 65 nodes per (prompt, layer)
FLOOR = 0.01


def first_rule() -> tuple[torch.Tensor, torch.Tensor]:
    """(alphas [N], weights [N, FIRST_LEVEL + 1]): the nodes of levels 0..FIRST_LEVEL, and per
    level j the weights h_j of its own nodes, so that one pass gives every level's new sum
    (T_0 = (f(0) + f(1)) / 2; T_j = T_(j-1) / 2 + h_j * sum(level j's nodes))."""
    levels = [nested_nodes(j) for j in range(FIRST_LEVEL + 1)]
    weights = torch.zeros(sum(map(len, levels)), FIRST_LEVEL + 1, dtype=torch.float64)
    lo = 0
    for j, nodes in enumerate(levels):
        weights[lo : lo + len(nodes), j] = 0.5**max(j, 1)
        lo += len(nodes)
    return torch.cat(levels), weights


def extend(row: torch.Tensor | None, new_sum: torch.Tensor) -> torch.Tensor:
    """The Romberg table's next row R(j, 0..j) [n, j + 1, F] from R(j-1, 0..j-1) and level j's new sum."""
    out = [new_sum if row is None else row[:, 0] / 2 + new_sum]
    for k in range(1, 1 if row is None else row.shape[1] + 1):
        out.append(out[k - 1] + (out[k - 1] - row[:, k - 1]) / (4**k - 1))
    return torch.stack(out, 1)


def integrate_adaptive(attributor, batch, clean, layers: list[int], baseline: float, tolerance: float):
    """(grad_sum [B, L, F], P at baseline [B, L], nodes used [B, L]) for every prompt of the batch
    and every layer of `layers`.

    grad_sum is the Romberg estimate of integral_0^1 dP/dx(b + alpha (a - b)) dalpha, as the
    fixed rules' sum_k w_k dP/dx(alpha_k) is.
    """
    B, L, dev = batch.size, len(layers), attributor.device
    estimate = torch.zeros(B, L, attributor._width, device=dev)
    p_zero = torch.zeros(B, L, device=dev)
    used = torch.full((B, L), 2**FIRST_LEVEL + 1, dtype=torch.int32)
    alphas, weights = first_rule()
    alphas, weights = alphas.float().to(dev), weights.float().to(dev)
    prompts, slots, rows = [], [], []  # the (prompt, layer slot) pairs still open, and their Romberg rows
    for li, layer in enumerate(layers):
        sums, p0 = attributor._integrate(batch, clean, layer, alphas, weights, 0, baseline)  # [B, K, F], [B]
        row = None
        for j in range(FIRST_LEVEL + 1):
            row = extend(row, sums[:, j])
        p_zero[:, li], estimate[:, li] = p0, row[:, -1]
        open_ = torch.arange(B, device=dev)
        open_ = open_[_unconverged(clean, layer, open_, p0, row[:, -1], baseline, tolerance)]
        prompts.append(open_)
        slots.append(torch.full((len(open_),), li, dtype=torch.long))
        rows.append(row[open_])
    prompt, slot, row = torch.cat(prompts), torch.cat(slots), torch.cat(rows)
    for level in range(FIRST_LEVEL + 1, MAX_LEVEL + 1):
        if len(prompt) == 0:
            break
        nodes = nested_nodes(level).float().to(dev)
        n, A = len(prompt), len(nodes)
        pair = torch.arange(n).repeat_interleave(A)
        step = torch.arange(A).repeat(n)
        sums, _ = attributor._integrate_rows(batch, clean, prompt[pair.to(dev)], torch.tensor(layers)[slot][pair],
                                             nodes[step.to(dev)], torch.full((n * A, 1), 0.5**level, device=dev),
                                             pair.to(dev), n, baseline)
        row = extend(row, sums[:, 0])
        estimate[prompt, slot.to(dev)] = row[:, -1]
        used[prompt.cpu(), slot] = 2**level + 1
        keep = torch.zeros(n, dtype=torch.bool, device=dev)
        for li in slot.unique().tolist():  # the check reads each layer's activations
            mine = (slot == li).to(dev)
            keep[mine] = _unconverged(clean, layers[li], prompt[mine], p_zero[prompt[mine], li], row[mine, -1],
                                      baseline, tolerance)
        keep_host = keep.cpu()
        prompt, slot, row = prompt[keep], slot[keep_host], row[keep]
    return estimate, p_zero, used


def _unconverged(clean, layer, prompts, p0, grad_sum, baseline, tolerance) -> torch.Tensor:
    """Which of `prompts` still miss the tolerance at `layer` (a bool mask)."""
    gold = clean.gold_prob.float()[prompts]
    change = gold - p0
    residual = (((clean.acts[layer][prompts] - baseline) * grad_sum).sum(-1) - change).abs()
    return residual > tolerance * torch.maximum(change.abs(), FLOOR * gold)
