"""The computational graph of a transformer for edge attribution (EAP / EAP-IG).

Senders write into the residual stream: the input embeddings (`input`), every attention head
(`a{layer}.h{head}`) and every MLP (`m{layer}`). Receivers read it, each through its own copy:
every head, every MLP and the `logits`. Edge u -> v exists when u writes before v reads:
an earlier layer, or (sequential blocks) a head of the same layer into that layer's MLP.
The names follow EAP-IG (Hanna et al., 2024).

Index layout (used by the engine's tensors): sender 0 is `input`; layer l's heads are
1 + l (H + 1) + h and its MLP 1 + l (H + 1) + H. Receiver l (H + 1) + h is head h of layer l,
l (H + 1) + H the MLP, and the last one the logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import numpy as np


@dataclass(frozen=True)
class Graph:
    layers: int
    heads: int
    parallel: bool = False  # GPT-NeoX-style blocks: a layer's heads do not feed its MLP

    @property
    def num_senders(self) -> int:
        return 1 + self.layers * (self.heads + 1)

    @property
    def num_receivers(self) -> int:
        return self.layers * (self.heads + 1) + 1

    @cached_property
    def senders(self) -> list[str]:
        return ["input"] + [n for layer in range(self.layers) for n in self._block(layer)]

    @cached_property
    def receivers(self) -> list[str]:
        return [n for layer in range(self.layers) for n in self._block(layer)] + ["logits"]

    def _block(self, layer: int) -> list[str]:
        return [f"a{layer}.h{h}" for h in range(self.heads)] + [f"m{layer}"]

    @cached_property
    def valid(self) -> np.ndarray:
        """[senders, receivers] bool: which edges exist."""
        s_layer, s_mlp = self._positions(self.num_senders, 1)
        r_layer, r_mlp = self._positions(self.num_receivers - 1, 0)
        r_layer = np.append(r_layer, self.layers)  # logits read after the last block
        r_mlp = np.append(r_mlp, False)
        earlier = s_layer[:, None] < r_layer[None, :]
        same_block = (s_layer[:, None] == r_layer[None, :]) & ~s_mlp[:, None] & r_mlp[None, :]
        return earlier | (same_block if not self.parallel else False)

    def _positions(self, n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """(layer, is_mlp) of the first n indices of a layout that starts at `offset` (sender 0: input, layer -1)."""
        k = np.arange(n) - offset
        layer = np.where(k < 0, -1, k // (self.heads + 1))
        return layer, (k >= 0) & (k % (self.heads + 1) == self.heads)

    @property
    def num_edges(self) -> int:
        return int(self.valid.sum())

    def edge_names(self, flat: np.ndarray) -> list[str]:
        """`u->v` for flat indices into [senders, receivers]."""
        u, v = np.unravel_index(flat, self.valid.shape)
        return [f"{self.senders[i]}->{self.receivers[j]}" for i, j in zip(u, v)]
