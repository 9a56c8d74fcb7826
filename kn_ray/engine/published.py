"""The straightforward published method, kept as the benchmark's point of comparison.

As in the authors' release and the most used open-source library: for each layer, one
forward pass for the activations, then a batch of `n_steps` copies of the prompt with that
layer's target activation scaled by alpha, full forward and backward through the whole model.
"""

from __future__ import annotations

import numpy as np
import torch

from kn_ray.choices import PAPER_STEPS, RULE

from .hooks import edit_neurons
from .precision import autocast
from .quadrature import quadrature
from .model_runner import ModelRunner


class PublishedAttributor(ModelRunner):
    """Per-layer integrated gradients with batch = n_steps and no reuse (slow on purpose)."""

    def attribute_one(self, prompt: str, target: str, *, n_steps: int = PAPER_STEPS, rule: str = RULE,
                      layers: list[int] | None = None) -> np.ndarray:
        """Scores [layers, neurons] for one prompt (same definition as Attributor); default all layers."""
        enc = self.encode(prompt, target)
        ids = torch.tensor([list(enc.prompt_ids) + list(enc.object_ids[:-1])], device=self.device)
        pos, gold = enc.target_index, torch.tensor(enc.object_ids, device=self.device)
        preds = pos + torch.arange(len(enc.object_ids), device=self.device)
        alphas, weights = (t.float().to(self.device) for t in quadrature(n_steps, rule))
        scores = []
        for layer in range(self.lm.num_layers) if layers is None else layers:
            with torch.no_grad():
                a = self._activation(ids, layer, pos)
            x = (alphas[:, None] * a).requires_grad_(True)

            def put(inputs, x=x):
                inputs = inputs.clone()
                inputs[:, pos] = x.to(inputs.dtype)
                return inputs

            with autocast(self.precision, self.device), edit_neurons(self.model, self.adapter, layer, put):
                logits = self.model(input_ids=ids.expand(len(alphas), -1)).logits.float()
                logp = logits.log_softmax(-1)[:, preds].gather(-1, gold.expand(len(alphas), -1)[..., None])
                prob = logp.squeeze(-1).sum(-1).exp()
                (grad,) = torch.autograd.grad(prob.sum(), x)
            scores.append((a * (weights[:, None] * grad.float()).sum(0)).cpu().numpy())
        return np.stack(scores)

    def _activation(self, ids, layer, pos) -> torch.Tensor:
        seen = {}

        def read(inputs):
            seen["a"] = inputs[0, pos].float()
            return inputs

        with autocast(self.precision, self.device), edit_neurons(self.model, self.adapter, layer, read):
            self.model(input_ids=ids)
        return seen["a"]
