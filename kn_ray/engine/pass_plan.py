"""Which rows of several layers share a forward/backward pass: a cost model and its exact minimum.

A pass over rows scaled at several layers starts at the lowest of them, L0: a row of a higher
layer recomputes the clean blocks between L0 and its own layer. Sharing saves the fixed cost of
a pass (every block it runs reads all its weights, forward and backward, and the LM head's;
Python and kernel launches per module), which dominates while a pass has few rows; with many
rows a pass is bound by arithmetic and the recomputed blocks cost real time. In units of one
row-token through one block (its arithmetic), a pass from layer s over r rows of t tokens costs

    (n_layers - s + head_blocks) x FIXED  +  (n_layers - s) x r x t

(the head's arithmetic per row is the same however rows are grouped, and left out). FIXED is
the row-tokens whose arithmetic costs as much as one block's fixed cost (`fixed_cost`); rows of
one group that exceed a pass (`max_batch_tokens`) make more passes, each paying it.
`layer_groups` splits the sorted layers of the open rows into contiguous groups, one pass each,
at the least total cost (an exact O(L^2) dynamic programme over the distinct layers).
"""

from __future__ import annotations

import math

import torch

# Row-tokens through a block that cost as much as the block's fixed cost per pass. CPU: measured
# by benchmarks/pass_cost.py on SmolLM2-135M (random weights, fp32, one thread, AMD Zen 4): a
# block pass costs 3.9 ms + 0.19 ms per row-token (BENCHMARKS.md section 12). GPU: not measured;
# a pass is bound by kernel launches and weight reads until it holds some hundreds of row-tokens
# (the engine's smallest GPU pass, `ModelRunner._default_batch_tokens`, is 256).
FIXED_ROW_TOKENS = {"cpu": 20, "cuda": 256}


def fixed_cost(device: torch.device) -> int:
    """FIXED of the cost model for `device` (row-tokens through one block)."""
    return FIXED_ROW_TOKENS.get(device.type, FIXED_ROW_TOKENS["cuda"])


def head_blocks(model: torch.nn.Module, block: torch.nn.Module) -> float:
    """The LM head's weight reads per pass in blocks: its parameters over one block's."""
    head = model.get_output_embeddings()
    head_params = head.weight.numel() if head is not None else 0
    return head_params / max(1, sum(p.numel() for p in block.parameters()))


def pass_cost(start: int, rows: int, *, n_layers: int, tokens: int, fixed: float, head: float,
              rows_per_pass: int) -> float:
    """The model's cost of `rows` rows (of `tokens` tokens) run from layer `start`, in passes of
    at most `rows_per_pass` rows."""
    blocks = n_layers - start
    return math.ceil(rows / rows_per_pass) * (blocks + head) * fixed + blocks * rows * tokens


def layer_groups(layers: list[int], rows: list[int], **model) -> list[tuple[int, int]]:
    """Contiguous groups [(i, j)] of `layers` (sorted, distinct; `rows[k]` rows at layers[k]),
    one pass each (from layers[i]), at the least total `pass_cost` (keyword `model`)."""
    n = len(layers)
    total = [0] * (n + 1)
    for k, r in enumerate(rows):
        total[k + 1] = total[k] + r
    best, cut = [0.0] + [math.inf] * n, [0] * (n + 1)
    for j in range(1, n + 1):
        for i in range(j):
            cost = best[i] + pass_cost(layers[i], total[j] - total[i], **model)
            if cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], n
    while j > 0:
        groups.append((cut[j], j))
        j = cut[j]
    return groups[::-1]
