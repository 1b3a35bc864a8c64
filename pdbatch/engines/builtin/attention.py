"""Decode attention over the slot KV pool that reads each sequence's real tokens, not the
batch's longest.

A decode step's attention is memory-bound: it reads every active sequence's whole KV. Run as
one SDPA over the pool view `[:n, :, :L]`, every row pays for the longest context in the batch
(measured on the 200-prompt engine workload: 15.0M positions read for 8.6M real ones). Here
the slots are cut into runs of neighbours of similar length and each run gets one SDPA call on
its own `[a:b, :, :L_run]` view (no copy): a run grows while the padding it adds costs less
than the fixed price of another call. Rows of equal length stay one call, as before.

Prefill, and any forward outside a decode step (e.g. Hugging Face `generate` on the same model
object), goes to transformers' own SDPA path unchanged. The step's lengths come from the
SlotKVCache of the current thread (see `SlotKVCache.step`).
"""

from __future__ import annotations

import threading

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, AttentionMaskInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

NAME = "pdbatch_sdpa"

# One SDPA call costs about as much as reading this many KV positions of one layer (CPU,
# fp32, head_dim 64: ~15 us per call vs ~0.2 us per position); it sets how much padding a run
# may carry before a new call is cheaper.
CALL_COST_POSITIONS = 96

_current = threading.local()  # .runs: the decode step running on this thread, else None


def plan_runs(kv_lens: list[int], call_cost: int = CALL_COST_POSITIONS) -> list[tuple[int, int, int, bool]]:
    """Cut slots 0..n-1 into runs (start, stop, kv_len, ragged): extend the current run with the
    next slot when the padding that adds is cheaper than starting a new SDPA call. `ragged`
    runs hold rows shorter than kv_len and need the mask."""
    runs: list[tuple[int, int, int, bool]] = []
    start, longest, shortest = 0, 0, 0
    for i, n in enumerate(kv_lens):
        size = i - start
        if size and (size + 1) * max(longest, n) > size * longest + n + call_cost:
            runs.append((start, i, longest, shortest != longest))
            start = i
        if i == start:
            longest = shortest = n
        else:
            longest, shortest = max(longest, n), min(shortest, n)
    if kv_lens:
        runs.append((start, len(kv_lens), longest, shortest != longest))
    return runs


class decode_step:
    """Context manager: marks this thread as running a decode step with these per-slot KV
    lengths (new token included) and boolean mask [n, 1, 1, L]."""

    def __init__(self, kv_lens: list[int], mask: torch.Tensor):
        self.runs = plan_runs(kv_lens)
        self.mask = mask

    def __enter__(self):
        _current.step = self
        return self

    def __exit__(self, *exc):
        _current.step = None
        return False


def slot_attention(module, query, key, value, attention_mask, dropout: float = 0.0,
                   scaling: float | None = None, **kwargs):
    step = getattr(_current, "step", None)
    # Outside a decode step, or attention that needs more than a mask over each row's keys
    # (softcapping, sinks, position biases): transformers' own path.
    special = any(kwargs.get(k) is not None for k in ("softcap", "s_aux", "position_bias"))
    if step is None or query.shape[2] != 1 or special or kwargs.get("output_attentions"):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    # a sliding-window layer's mask (the decode step built it windowed) applies to every run
    windowed = kwargs.get("sliding_window") is not None and attention_mask is not None
    masks = attention_mask if windowed else step.mask
    n, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    # grouped-query attention without repeating K/V: the heads sharing a KV head become that KV
    # head's query rows (what transformers' own decode path does, `pack_gqa`)
    q = query.reshape(n, kv_heads, heads // kv_heads, dim)
    out = torch.empty_like(q)
    for a, b, length, ragged in step.runs:
        mask = masks[a:b, :, :, :length] if ragged or windowed else None
        out[a:b] = F.scaled_dot_product_attention(q[a:b], key[a:b, :, :length], value[a:b, :, :length],
                                                  attn_mask=mask, scale=scaling)
    return out.reshape(n, heads, 1, dim).transpose(1, 2), None


def register() -> str:
    """Make NAME usable as a model's attention implementation; returns it."""
    AttentionInterface.register(NAME, slot_attention)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME
