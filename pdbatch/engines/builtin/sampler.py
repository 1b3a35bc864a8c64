"""The built-in engine's token pick: greedy, or inverse-CDF sampling with one uniform draw per
(seed, step) from pdbatch.engines.sampling, so a row's tokens do not depend on its batch."""

from __future__ import annotations

import torch

from ..sampling import SamplingParams, uniform


def sample_next(logits: torch.Tensor, params: list[SamplingParams], steps: list[int]) -> list[int]:
    """One token per row of `logits` [n, vocab]; `steps[i]` is how many tokens row i has generated."""
    # max().indices: the same first-maximum rule as argmax (Hugging Face's greedy pick), and
    # on CPU ~1.7x faster over a [64, 16K] batch of logits (1.1 vs 1.8 ms a decode step)
    out = logits.max(dim=-1).indices.tolist()
    for i, (p, step) in enumerate(zip(params, steps)):
        if not p.greedy:
            out[i] = _sample_row(logits[i], p, uniform(p.seed, step))
    return out


def _sample_row(logits: torch.Tensor, p: SamplingParams, u: float) -> int:
    # Inverse-CDF sampling with one uniform draw; the work is row-local, so the result cannot
    # depend on what else is in the batch.
    scaled = logits.float() / p.temperature
    top_k = p.top_k if p.top_k > 0 else 0
    if top_k == 0 and p.top_p >= 1.0:
        probs = torch.softmax(scaled, dim=-1)
        idx = None
    else:
        if top_k:
            scaled, idx = torch.topk(scaled, min(top_k, scaled.numel()))
        else:
            scaled, idx = torch.sort(scaled, descending=True)
        probs = torch.softmax(scaled, dim=-1)
        if p.top_p < 1.0:
            # keep the smallest prefix whose mass reaches top_p (always at least one token)
            before = torch.cumsum(probs, dim=-1) - probs
            probs = torch.where(before < p.top_p, probs, torch.zeros_like(probs))
    cdf = torch.cumsum(probs, dim=-1)
    pos = int(torch.searchsorted(cdf, torch.tensor([u * float(cdf[-1])], dtype=cdf.dtype)).item())
    pos = min(pos, cdf.numel() - 1)
    while probs[pos] == 0 and pos > 0:  # never land on a filtered-out token at the edge
        pos -= 1
    return int(idx[pos]) if idx is not None else pos
