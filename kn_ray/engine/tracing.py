"""Causal tracing (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", ROME).

For a prompt, its target and its subject: run the prompt clean, then `samples` times with
Gaussian noise on the subject's token embeddings (std = `noise` x the std of the model's input
embeddings; ROME: 3x), and for every kind of state, layer and token restore the clean state in
the corrupted run and read P(gold) (teacher forced over a multi-token target):

* `resid`: the block's output hidden state at (layer, token);
* `mlp` / `attn`: what the MLP / attention sublayer writes (the adapter's `hook_mlp_out` /
  `hook_attn_out`, before any residual add or post-norm), restored at once over the `window`
  layers [layer - window // 2, layer + ceil(window / 2)) clipped to the model (ROME's window, 10).

`p_restored[kind, layer, token]` is P(gold) after the restoration averaged over the samples;
`p_clean` is P(gold) of the clean run, `p_corrupted` the corrupted runs' mean. The noise draws
are `noise_draws(seed, ...)`, the same for every prompt (as ROME's fixed RandomState): a
result does not depend on which shard or batch computed it.

How it is computed (causal LMs only: a masked LM reads both sides of the subject):

* one clean pass records every state to restore; one pass of `samples` rows records the
  corrupted runs: every block's input and the key/value cache;
* tokens before the subject are never corrupted, so restoring them leaves the run unchanged:
  their P is exactly p_corrupted, without a pass;
* a restoration at token t changes nothing at positions before t, and nothing below its first
  restored layer b: its row starts at block b from the cached corrupted input, over the columns
  t.. only, the earlier positions read from the corrupted key/value cache. Rows of one token
  are sorted by their first layer and batched (a pass starts at its lowest: a row of a higher
  layer recomputes its corrupted blocks in between, up to rounding).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from .encoding import Encoded, SkipPrompt
from .hooks import first_arg, first_output, gather_head_input, post_hooks, pre_hooks, start_at_layer, with_first_output
from .model_runner import ModelRunner, _as_list, describe, gold_prob, is_oom
from .precision import autocast

KINDS = ("resid", "mlp", "attn")
ROLES = ("before", "subject_first", "subject_middle", "subject_last", "further", "last")
SAMPLES, NOISE, WINDOW = 10, 3.0, 10  # ROME's defaults
CPU_TRACE_TOKENS = 1024  # row-tokens per restoration pass on a CPU (benchmarks/trace_bench.py)
MASKED_REASON = "causal tracing needs a causal LM (a masked LM reads both sides of the subject)"


@dataclass
class Trace:
    """Causal trace of one (prompt, target, subject)."""

    prompt: str
    target: str
    subject: str
    status: str = "ok"  # ok | skipped | error
    reason: str | None = None
    kinds: tuple[str, ...] = ()
    p_restored: np.ndarray | None = None  # [kinds, layers, prompt tokens]: P(gold) restored, mean over samples
    p_clean: float = math.nan
    p_corrupted: float = math.nan  # mean over samples
    subject_span: tuple[int, int] = (0, 0)  # [first, end) token indices of the subject in the prompt
    tokens: list[str] = field(default_factory=list)  # the prompt's tokens, as text
    noise_std: float = math.nan  # the noise's std (noise x the embeddings' std)
    samples: int = 0
    window: int = 0
    seconds: float = 0.0
    rows: int = 0  # restoration rows computed (kinds x layers x tokens from the subject on x samples)
    passes: int = 0  # forward passes, the clean and corrupted ones included

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    @property
    def roles(self) -> list[str]:
        return token_roles(len(self.tokens), self.subject_span)

    def restored(self, kind: str) -> np.ndarray:
        """[layers, tokens] for one kind."""
        return self.p_restored[self.kinds.index(kind)]


def window_layers(layer: int, window: int, num_layers: int) -> range:
    """The layers restored at once for `layer` (ROME: [l - w // 2, l + ceil(w / 2)), clipped)."""
    return range(max(0, layer - window // 2), min(num_layers, layer - (-window // 2)))


def restored_layers(kind: str, layer: int, window: int, num_layers: int) -> range:
    return range(layer, layer + 1) if kind == "resid" else window_layers(layer, window, num_layers)


def token_roles(n_tokens: int, span: tuple[int, int]) -> list[str]:
    """Each prompt token's role (ROME's categories): before the subject, its first, middle and last
    tokens (a one-token subject's only token is its last), the further tokens, the last token (a
    subject token keeps its subject role)."""
    s0, s1 = span
    roles = []
    for t in range(n_tokens):
        if t < s0:
            roles.append("before")
        elif t == s1 - 1:
            roles.append("subject_last")
        elif t == s0:
            roles.append("subject_first")
        elif t < s1:
            roles.append("subject_middle")
        else:
            roles.append("last" if t == n_tokens - 1 else "further")
    return roles


def noise_draws(seed: int, samples: int, tokens: int, hidden: int) -> torch.Tensor:
    """The standard normal draws [samples, subject tokens, hidden] (float32, on the host), the same
    for every prompt of a run."""
    return torch.randn(samples, tokens, hidden, generator=torch.Generator().manual_seed(seed))


def subject_span(tokenizer, prompt: str, subject: str, prompt_ids: Sequence[int]) -> tuple[int, int]:
    """[first, end) token indices of the subject's first occurrence in the prompt: the tokens of the
    prompt's text up to the subject (without trailing space) and up to the subject's end, which
    must both be prefixes of the prompt's tokens; SkipPrompt with the reason otherwise."""
    subject = (subject or "").strip()
    if not subject:
        raise SkipPrompt("empty subject")
    start = prompt.find(subject)
    if start < 0:
        raise SkipPrompt(f"subject {subject!r} not found in the prompt")
    before = _prefix_ids(tokenizer, prompt[:start].rstrip(), prompt_ids)
    through = _prefix_ids(tokenizer, prompt[: start + len(subject)], prompt_ids)
    ids = list(prompt_ids)
    if before != ids[: len(before)] or through != ids[: len(through)] or len(through) <= len(before):
        raise SkipPrompt(f"subject {subject!r}: its tokens do not align with the prompt's")
    return len(before), len(through)


def _prefix_ids(tokenizer, text: str, prompt_ids: Sequence[int]) -> list[int]:
    ids = list(tokenizer(text)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and ids[-1] == eos and ids != list(prompt_ids[: len(ids)]):  # tokenizers that append EOS
        ids = ids[:-1]
    return ids


def embedding_std(model: torch.nn.Module) -> float:
    """The std of the input embedding module's output over the whole vocabulary (the scale of the
    noise; a scaled embedding such as Gemma 3's is read as the model adds it)."""
    embed = model.get_input_embeddings()
    n = embed.num_embeddings
    device = embed.weight.device if embed.weight.device.type != "meta" else torch.device("cpu")
    total = squares = torch.zeros((), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for lo in range(0, n, 4096):
            out = embed(torch.arange(lo, min(n, lo + 4096), device=device)).double().cpu()
            total, squares, count = total + out.sum(), squares + (out * out).sum(), count + out.numel()
    mean = total / count
    return float((squares / count - mean * mean).clamp(min=0).sqrt())


@dataclass
class _Options:
    samples: int
    noise: float
    window: int
    kinds: tuple[str, ...]
    seed: int


@dataclass
class _Corrupted:
    hidden: list[torch.Tensor]  # per layer: the block's input [samples, T - s0, d] (columns from the subject on)
    kv: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys, values [samples, heads, T, head_dim]
    probs: torch.Tensor  # [samples]


class Tracer(ModelRunner):
    """Causal traces of (prompt, target, subject) triples (module docstring)."""

    _noise_std: float | None = None

    def noise_std(self) -> float:
        """The std of the input embeddings (computed once per model)."""
        if self._noise_std is None:
            self._noise_std = embedding_std(self.model)
        return self._noise_std

    def trace(self, prompts: str | Sequence[str], targets: str | Sequence[str], subjects: str | Sequence[str], *,
              samples: int = SAMPLES, noise: float = NOISE, window: int = WINDOW, kinds: Sequence[str] = KINDS,
              seed: int = 0) -> list[Trace]:
        """One Trace per prompt; a prompt that cannot be traced (no subject in it, a masked LM) is
        skipped with the reason, one that fails is an error with it."""
        prompts, targets, subjects = _as_list(prompts), _as_list(targets), _as_list(subjects)
        if not len(prompts) == len(targets) == len(subjects):
            raise ValueError(f"{len(prompts)} prompts, {len(targets)} targets and {len(subjects)} subjects")
        kinds = tuple(kinds)
        if not kinds or len(set(kinds)) != len(kinds) or any(k not in KINDS for k in kinds):
            raise ValueError(f"kinds must be distinct names among {', '.join(KINDS)}; got {kinds!r}")
        if samples < 1 or window < 1 or not noise >= 0:
            raise ValueError(f"samples and window must be >= 1 and noise >= 0; got {samples}, {window}, {noise}")
        opts = _Options(int(samples), float(noise), int(window), kinds, int(seed))
        return [self._trace_safely(p, t, s, opts) for p, t, s in zip(prompts, targets, subjects)]

    def _trace_safely(self, prompt: str, target: str, subject: str, opts: _Options) -> Trace:
        start = time.perf_counter()
        base = dict(prompt=prompt, target=target, subject=subject, kinds=opts.kinds, samples=opts.samples,
                    window=opts.window)
        if self.adapter.masked:
            return Trace(**base, status="skipped", reason=MASKED_REASON)
        try:
            enc = self.encode(prompt, target)
            span = subject_span(self.tokenizer, prompt, subject, enc.prompt_ids)
        except SkipPrompt as skip:
            return Trace(**base, status="skipped", reason=str(skip))
        try:
            out = self._trace(enc, span, opts)
        except Exception as error:  # noqa: BLE001 - one prompt's failure is its error row
            return Trace(**base, status="error", reason=describe(error))
        return Trace(**base, **out, subject_span=span, tokens=self.token_texts(list(enc.prompt_ids)),
                     seconds=time.perf_counter() - start)

    # ---- one prompt ------------------------------------------------------------------------
    @torch.no_grad()
    def _trace(self, enc: Encoded, span: tuple[int, int], opts: _Options) -> dict:
        batch = self._collate([enc])
        P, L, S = len(enc.prompt_ids), self.lm.num_layers, opts.samples
        s0, s1 = span
        clean, p_clean = self._clean(batch, opts.kinds)
        std = self.noise_std() * opts.noise
        draws = noise_draws(opts.seed, S, s1 - s0, self.model.get_input_embeddings().embedding_dim) * std
        corrupted = self._corrupted(batch, span, draws)
        p_corrupted = float(corrupted.probs.double().mean())
        sums = torch.zeros(len(opts.kinds), L, P, dtype=torch.float64)
        passes = rows = 0
        every = self._rows_of(opts, L, S)
        for t in range(s0, P):
            lo = 0
            while lo < len(every["kind"]):
                n = max(1, self._pass_tokens() // (batch.input_ids.shape[1] - t))
                part = {name: value[lo: lo + n] for name, value in every.items()}
                try:
                    probs = self._restore(batch, clean, corrupted, t, opts.kinds, part)
                except Exception as error:  # noqa: BLE001
                    if not is_oom(error) or n == 1:
                        raise
                    self._back_off()
                    continue
                sums.index_put_((part["kind"], part["layer"], torch.full_like(part["kind"], t)),
                                probs.double().cpu(), accumulate=True)
                passes, rows, lo = passes + 1, rows + len(probs), lo + len(probs)
        p_restored = (sums / S).numpy()
        p_restored[:, :, :s0] = p_corrupted  # tokens before the subject are never corrupted
        return dict(p_restored=p_restored.astype(np.float64), p_clean=p_clean, p_corrupted=p_corrupted,
                    noise_std=std, rows=rows, passes=passes + 2)

    def _pass_tokens(self) -> int:
        on_gpu = any(d.type == "cuda" for d in self.lm.devices)
        return self.max_batch_tokens if on_gpu else min(self.max_batch_tokens, CPU_TRACE_TOKENS)

    @staticmethod
    def _rows_of(opts: _Options, L: int, S: int) -> dict[str, torch.Tensor]:
        """Every restoration row of one token: its kind (index), layer, sample and the layers
        [first, end) it restores, sorted by its first layer."""
        K = len(opts.kinds)
        kind = torch.arange(K).repeat_interleave(L * S)
        layer = torch.arange(L).repeat_interleave(S).repeat(K)
        spans = torch.tensor([[(r.start, r.stop) for r in (restored_layers(k, l, opts.window, L) for l in range(L))]
                              for k in opts.kinds])
        rows = dict(kind=kind, layer=layer, sample=torch.arange(S).repeat(K * L), first=spans[kind, layer, 0],
                    end=spans[kind, layer, 1])
        order = torch.argsort(rows["first"], stable=True)
        return {name: value[order] for name, value in rows.items()}

    def _modules(self, kind: str) -> list[torch.nn.Module]:
        adapter, model = self.adapter, self.model
        if kind == "resid":
            return list(adapter.blocks(model))
        site = "hook_mlp_out" if kind == "mlp" else "hook_attn_out"
        return [adapter.site_module(model, site, i)[0] for i in range(self.lm.num_layers)]

    def _clean(self, batch, kinds) -> tuple[dict[str, list[torch.Tensor]], float]:
        """Every state to restore, per kind and layer [T, d] (on its module's device), and P(gold)."""
        states: dict[str, list] = {k: [None] * self.lm.num_layers for k in kinds}

        def saver(kind):
            def save(i, out):
                states[kind][i] = first_output(out)[0].detach()

            return save

        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast(self.precision, self.device))
            for kind in kinds:
                stack.enter_context(post_hooks(self._modules(kind), saver(kind)))
            stack.enter_context(gather_head_input(self.model, self.adapter, batch.pred_cols))
            rows = torch.arange(1, device=self.device)
            logits = self.model(**self._inputs(batch, rows), use_cache=False).logits.to(self.device)
        return states, float(gold_prob(logits, batch.gold_ids, batch.gold_valid)[0])

    def _corrupted(self, batch, span, draws: torch.Tensor) -> _Corrupted:
        """`samples` rows with noise on the subject's embeddings: every block's input from the
        subject on, the key/value cache and P(gold) per sample."""
        s0, s1 = span
        S = draws.shape[0]
        hidden: list = [None] * self.lm.num_layers

        def add_noise(_i, out):
            h = first_output(out)
            noisy = h.clone()
            noisy[:, s0:s1] += draws.to(h.device, h.dtype)
            return with_first_output(out, noisy)

        def save(i, args, kwargs):
            hidden[i] = first_arg(args, kwargs)[:, s0:].detach()

        rows = torch.zeros(S, dtype=torch.long, device=self.device)
        with contextlib.ExitStack() as stack:
            stack.enter_context(autocast(self.precision, self.device))
            stack.enter_context(post_hooks([self.model.get_input_embeddings()], add_noise))
            stack.enter_context(pre_hooks(list(self.adapter.blocks(self.model)), save))
            stack.enter_context(gather_head_input(self.model, self.adapter, batch.pred_cols[rows]))
            out = self.model(**self._inputs(batch, rows), **self._full_cache())
        logits = out.logits.to(self.device)
        probs = gold_prob(logits, batch.gold_ids[rows], batch.gold_valid[rows])
        kv = [(lay.keys, lay.values) for lay in out.past_key_values.layers]
        return _Corrupted(hidden, kv, probs)

    def _restore(self, batch, clean, corrupted: _Corrupted, t: int, kinds: tuple[str, ...], part: dict) -> torch.Tensor:
        """P(gold) [R] of the rows `part` restored at token t: columns t.. only, from the rows' lowest
        first layer b (its corrupted input cached), earlier positions from the corrupted cache."""
        R, L, dev = len(part["kind"]), self.lm.num_layers, self.device
        b = int(part["first"].min())
        hidden = corrupted.hidden[b]
        s0 = batch.input_ids.shape[1] - hidden.shape[1]
        si = part["sample"].to(dev)
        h = hidden[si.to(hidden.device), t - s0:]
        rows = torch.zeros(R, dtype=torch.long, device=dev)
        inputs = self._inputs(batch, rows, t)
        if t > 0:
            kv = [(k[:, :, :t], v[:, :, :t]) for k, v in corrupted.kv]
            inputs.update(past_key_values=self._prefix_cache(kv, si, b), use_cache=True)
        else:
            inputs.update(use_cache=False)
        patches: dict[str, dict[int, torch.Tensor]] = {}  # kind: {layer: host rows restored there}
        for k, kind in enumerate(kinds):
            mine = part["kind"] == k
            for j in range(b, L):
                hit = (mine & (part["first"] <= j) & (part["end"] > j)).nonzero()[:, 0]
                if len(hit):
                    patches.setdefault(kind, {})[j] = hit

        def patcher(kind: str, layers: list[int]):
            def patch(i, out):
                layer = layers[i]
                x = first_output(out)
                r = patches[kind][layer].to(x.device)
                value = clean[kind][layer][t].to(x.device, x.dtype)
                return with_first_output(out, x.index_put((r, torch.zeros_like(r)), value))

            return patch

        with contextlib.ExitStack() as stack:
            for kind, by_layer in patches.items():  # before the blocks below b are swapped out
                layers = sorted(by_layer)
                modules = self._modules(kind)
                stack.enter_context(post_hooks([modules[j] for j in layers], patcher(kind, layers)))
            stack.enter_context(autocast(self.precision, dev))
            stack.enter_context(start_at_layer(self.model, self.adapter, b, h))
            stack.enter_context(gather_head_input(self.model, self.adapter, batch.pred_cols[rows] - t))
            logits = self.model(**inputs).logits.to(dev)
        return gold_prob(logits, batch.gold_ids[rows], batch.gold_valid[rows])
