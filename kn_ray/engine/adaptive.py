"""Adaptive steps (`n_steps="auto"`): per prompt and layer, only as many nodes as the integral needs.

The trapezoid rule on 2^j intervals reuses every node of the rule on 2^(j-1) intervals, so
doubling it costs only the new midpoints. Romberg (Richardson) extrapolation of those nested
sums is a high-order rule on the same nodes (`quadrature.romberg_weights` is its fixed-rule
form). After each doubling, a (prompt, layer) stops when both

    score error  ||s_j - s_(j-1)||_2 / max(||s_j||_2, FLOOR * P) <= tolerance
    completeness |sum_i s_j,i - (P - P(layer at baseline))| <= tolerance * max(|P - P(baseline)|, FLOOR * P)

hold, s_j being the layer's score vector from the Romberg estimate R(j, j) and s_(j-1) the one
before (R(j-1, j-1)); the others go on, up to 2^MAX_LEVEL + 1 nodes. The score error bounds the
scores themselves (the completeness residual only bounds their sum: many errors can cancel in
it); as the difference from the previous, less accurate, estimate it is pessimistic for the
last one. The FLOOR keeps a layer that barely moves P (whose scores are all rounding) from
running to the cap. The last score error of each (prompt, layer) is reported (`score_error`).

Time follows evaluations: the nodes up to FIRST_LEVEL for every (prompt, layer), and each later
doubling's nodes for every (prompt, layer) that has not converged yet, run in passes shared across
prompts and layers; a pass starts at the lowest of its layers, and `pass_plan` splits the layers
into the contiguous groups that cost least (few rows: one pass across layers, as reading weights
bounds it; many rows: about one pass per layer, as recomputing the blocks between would cost more).
"""

from __future__ import annotations

import torch

from .pass_plan import fixed_cost, head_blocks, layer_groups
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
    """(grad_sum [B, L, F], P at baseline [B, L], nodes used [B, L], score error [B, L]) for every
    prompt of the batch and every layer of `layers`.

    grad_sum is the Romberg estimate of integral_0^1 dP/dx(b + alpha (a - b)) dalpha, as the
    fixed rules' sum_k w_k dP/dx(alpha_k) is.
    """
    B, L, dev = batch.size, len(layers), attributor.device
    estimate = torch.zeros(B, L, attributor._width, device=dev)
    p_zero = torch.zeros(B, L, device=dev)
    error = torch.full((B, L), float("nan"), device=dev)
    used = torch.full((B, L), 2**FIRST_LEVEL + 1, dtype=torch.int32)
    alphas, weights = first_rule()  # alphas[0] = 0: P at the baseline
    prompt, slot = torch.arange(B).repeat(L), torch.arange(L).repeat_interleave(B)  # host, by layer
    kept, rows = [], []
    for lo, hi, sums, probs in _passes(attributor, batch, clean, layers, prompt, slot, alphas, weights, baseline):
        row = previous = None
        for j in range(FIRST_LEVEL + 1):
            previous, row = row, extend(row, sums[:, j])
        pi, si = prompt[lo:hi].to(dev), slot[lo:hi].to(dev)
        p_zero[pi, si], estimate[pi, si] = probs[:, 0], row[:, -1]
        keep, error[pi, si] = _open(clean, layers, prompt[lo:hi], slot[lo:hi], probs[:, 0], row[:, -1],
                                    previous[:, -1], baseline, tolerance)
        kept.append(torch.arange(lo, hi)[keep.cpu()])
        rows.append(row[keep])
    keep = torch.cat(kept)
    prompt, slot, row = prompt[keep], slot[keep], torch.cat(rows)
    for level in range(FIRST_LEVEL + 1, MAX_LEVEL + 1):
        if len(prompt) == 0:
            break
        nodes = nested_nodes(level)
        kept, rows = [], []
        for lo, hi, sums, _ in _passes(attributor, batch, clean, layers, prompt, slot, nodes,
                                       torch.full((len(nodes), 1), 0.5**level, dtype=torch.float64), baseline):
            part = extend(row[lo:hi], sums[:, 0])
            pi, si = prompt[lo:hi].to(dev), slot[lo:hi].to(dev)
            estimate[pi, si] = part[:, -1]
            used[prompt[lo:hi], slot[lo:hi]] = 2**level + 1
            keep, error[pi, si] = _open(clean, layers, prompt[lo:hi], slot[lo:hi], p_zero[pi, si], part[:, -1],
                                        row[lo:hi, -1], baseline, tolerance)
            kept.append(torch.arange(lo, hi)[keep.cpu()])
            rows.append(part[keep])
        keep = torch.cat(kept)
        prompt, slot, row = prompt[keep], slot[keep], torch.cat(rows)
    return estimate, p_zero, used, error


def _passes(attributor, batch, clean, layers, prompt, slot, alphas, weights, baseline):
    """Every node of `alphas` for every pair (prompt[k], layers[slot[k]]) (host tensors, sorted by
    slot), in the passes `pass_plan.layer_groups` chooses: per pass, (lo, hi, sums [hi - lo, K, F]
    = sum_a weights[a] dP/dx(alpha_a), P [hi - lo, A]) for the pairs lo..hi-1."""
    dev, A = attributor.device, len(alphas)
    layer_of = torch.tensor(layers)[slot]
    distinct, counts = torch.unique_consecutive(layer_of, return_counts=True)
    bounds = [0] + counts.cumsum(0).tolist()
    plan = layer_groups(distinct.tolist(), (counts * A).tolist(), **cost_model(attributor, batch))
    alphas, weights = alphas.float().to(dev), weights.float().to(dev)
    for i, j in plan:
        lo, hi = bounds[i], bounds[j]
        n = hi - lo
        pair, step = torch.arange(n).repeat_interleave(A), torch.arange(A).repeat(n)
        pair_d, step_d = pair.to(dev), step.to(dev)
        sums, probs = attributor._integrate_rows(batch, clean, prompt[lo:hi][pair].to(dev), layer_of[lo:hi][pair],
                                                 alphas[step_d], weights[step_d], pair_d, n, baseline)
        yield lo, hi, sums, probs.view(n, A)


def cost_model(attributor, batch) -> dict:
    """`pass_plan.pass_cost`'s parameters for this model, device and batch."""
    tokens = batch.input_ids.shape[1] - batch.start_col  # per row (causal rows start at the target)
    blocks = attributor.adapter.blocks(attributor.model)
    return dict(n_layers=len(blocks), tokens=tokens, fixed=fixed_cost(attributor.device),
                head=head_blocks(attributor.model, blocks[0]),
                rows_per_pass=max(1, attributor.max_batch_tokens // tokens))


def _open(clean, layers, prompt, slot, p0, grad_sum, previous, baseline, tolerance):
    """(which pairs (prompt[k], layers[slot[k]]) (host tensors) still miss the tolerance, their
    score errors): a bool mask and a float tensor on the device; the check reads each layer's
    activations."""
    dev = p0.device
    keep = torch.zeros(len(prompt), dtype=torch.bool, device=dev)
    error = torch.zeros(len(prompt), device=dev)
    for li in slot.unique().tolist():
        mine = slot == li
        md = mine.to(dev)
        keep[md], error[md] = _unconverged(clean, layers[li], prompt[mine].to(dev), p0[md], grad_sum[md],
                                           previous[md], baseline, tolerance)
    return keep, error


def _unconverged(clean, layer, prompts, p0, grad_sum, previous, baseline, tolerance):
    """(which of `prompts` still miss the tolerance at `layer` (a bool mask), their score errors)."""
    gold = clean.gold_prob.float()[prompts]
    change = gold - p0
    delta = clean.acts[layer][prompts] - baseline
    scores = delta * grad_sum
    residual = (scores.sum(-1) - change).abs()
    error = (delta * (grad_sum - previous)).norm(dim=-1) / torch.maximum(scores.norm(dim=-1), FLOOR * gold)
    return (residual > tolerance * torch.maximum(change.abs(), FLOOR * gold)) | (error > tolerance), error
