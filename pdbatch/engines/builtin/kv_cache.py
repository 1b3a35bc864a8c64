"""The decode worker's KV cache: a slot pool that continuous batching can grow and shrink
without copying the other sequences.

Per layer, keys and values live in one tensor [slots, kv_heads, max_len, head_dim]. The active
sequences always occupy slots 0..n-1, so the batch the model sees is a view `[:n, :, :L]`
(no gather, no re-padding). A finishing sequence's slot is refilled by moving the LAST active
sequence into it: one sequence copied, never the whole batch. Each sequence reserves
prompt + max_new_tokens positions at admission, so it never needs to grow mid-generation; the
pool itself grows (rarely, amortized by doubling) up to the memory budget.

It plugs into Hugging Face models as a `Cache`: `update()` writes each step's new K/V at each
sequence's own position and returns the views. Positions and the attention mask come from the
engine, so left/right padding never enters the picture.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from transformers.cache_utils import Cache

from .attention import decode_step
from .support import FULL, MaskPlan


class SlotKVCache(Cache):
    def __init__(self, layers: int, kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, budget_bytes: int, max_slots: int = 256, len_limit: int = 1 << 20,
                 masks: MaskPlan | None = None):
        super().__init__(layers=[])
        self.masks = masks or MaskPlan("single", {FULL: None})
        self.num_layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        self.dtype, self.device = dtype, device
        self.budget_bytes, self.max_slots, self.len_limit = budget_bytes, max_slots, len_limit
        self.k: list[torch.Tensor] = []
        self.v: list[torch.Tensor] = []
        self.slots = 0  # allocated capacity
        self.max_len = 0
        self.lengths: list[int] = []  # tokens held per active slot
        self.peak_bytes = 0  # largest pool allocated: the budget is a promise, this checks it
        self._rows = self._pos = None
        self._kv_len = 0

    # --- capacity ----------------------------------------------------------------------
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def pool_bytes(self, slots: int, max_len: int) -> int:
        return slots * max_len * self.bytes_per_token()

    @property
    def n(self) -> int:
        return len(self.lengths)

    def fits(self, reserve_len: int) -> bool:
        """Can one more sequence needing `reserve_len` positions be admitted now? An empty pool is
        reallocated for it (_grow), whatever its shape: a pool grown wide for short sequences must
        not refuse a long one for ever (measured: a decode loop spinning on a packet that fitted
        the budget alone but not the idle pool's slot count)."""
        if self.n + 1 > self.max_slots:
            return False
        if not self.n:
            return self.ever_fits(reserve_len)
        need_slots, need_len = max(self.slots, self.n + 1), max(self.max_len, reserve_len)
        return self.pool_bytes(need_slots, need_len) <= self.budget_bytes

    def ever_fits(self, reserve_len: int) -> bool:
        return self.pool_bytes(1, reserve_len) <= self.budget_bytes

    def _grow(self, need_slots: int, need_len: int) -> None:
        if need_slots <= self.slots and need_len <= self.max_len:
            return
        if self.n:  # sequences are held: the pool only grows
            need_slots, need_len = max(need_slots, self.slots), max(need_len, self.max_len)
        else:  # empty: a fresh pool shaped for what is asked (see fits)
            self.k, self.v, self.slots, self.max_len = [], [], 0, 0
        # Slots double when the budget allows (few reallocations). The length axis grows only to
        # the longest reservation (rounded to 64): every slot pays for it, so doubling it would
        # spend the budget on padding and admit fewer sequences.
        length = max(need_len, min(-(-need_len // 64) * 64, self.len_limit))
        if self.pool_bytes(need_slots, length) > self.budget_bytes:
            length = need_len
        slots = min(max(need_slots, 2 * self.slots), self.max_slots)
        if self.pool_bytes(slots, length) > self.budget_bytes:
            slots = need_slots
        shape = (slots, self.kv_heads, length, self.head_dim)
        new_k, new_v = [], []
        n, old = self.n, self.max_len
        for layer in range(self.num_layers):  # amortized: happens O(log) times per job
            # Uninitialised: the held rows are written now, a free slot when add() fills it.
            # Zero-filling the whole pool here stalled the decode loop (it admits and steps
            # nothing meanwhile) on page faults for memory no row used yet: bench-30m, 24 rows of
            # ~1000 positions, the slowest admission 0.98 s -> 0.37 s (growing to 32 slots).
            nk = self._uninitialised(shape, self.dtype, self.device)
            nv = self._uninitialised(shape, self.dtype, self.device)
            if n:
                nk[:n, :, :old] = self.k[layer][:n]
                nv[:n, :, :old] = self.v[layer][:n]
                nk[:n, :, old:] = 0
                nv[:n, :, old:] = 0
            if self.k:  # free each old layer once copied: the peak is the new pool plus one old
                self.k[layer] = self.v[layer] = None  # layer, not twice the budget
            new_k.append(nk)
            new_v.append(nv)
        self.k, self.v, self.slots, self.max_len = new_k, new_v, slots, length
        self.peak_bytes = max(self.peak_bytes, self.pool_bytes(slots, length))

    @staticmethod
    def _uninitialised(shape, dtype, device) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=device)

    # --- sequences -----------------------------------------------------------------------
    def add(self, kv: torch.Tensor, reserve_len: int) -> int:
        """Copy a packet's KV [layers, 2, kv_heads, len, head_dim] into the next slot."""
        length = kv.shape[3]
        self._grow(self.n + 1, max(reserve_len, length))
        slot = self.n
        kv = kv.to(self.device, non_blocking=True)
        for layer in range(self.num_layers):
            self.k[layer][slot, :, :length] = kv[layer, 0]
            self.v[layer][slot, :, :length] = kv[layer, 1]
            # a batch's attention reads every row up to the longest (masked, weight 0): the rest
            # of the slot must hold finite values, not whatever the allocation left there
            self.k[layer][slot, :, length:] = 0
            self.v[layer][slot, :, length:] = 0
        self.lengths.append(length)
        return slot

    def remove(self, slot: int) -> None:
        """Free `slot` by moving the last sequence into it (one sequence copied)."""
        last = self.n - 1
        if slot != last:
            length = self.lengths[last]
            for layer in range(self.num_layers):
                self.k[layer][slot, :, :length] = self.k[layer][last, :, :length]
                self.v[layer][slot, :, :length] = self.v[layer][last, :, :length]
            self.lengths[slot] = length
        self.lengths.pop()

    # --- one decode step -------------------------------------------------------------------
    @contextmanager
    def step(self):
        """One new token per active sequence: yields position ids [n, 1] and the attention mask
        the model takes (support.MaskPlan: a 2-D mask, one 4-D mask [n, 1, 1, L], or a dict of
        them per layer type), and tells decode attention each row's real length."""
        pos = torch.tensor(self.lengths, dtype=torch.long, device=self.device)
        self._kv_len = max(self.lengths) + 1
        self._rows = torch.arange(self.n, device=self.device)
        self._pos = pos
        j = torch.arange(self._kv_len, device=self.device)[None, :]
        seen = j <= pos[:, None]  # [n, L]: each row's own tokens, the new one included
        plan = self.masks
        if plan.kind == "2d":
            model_mask = seen.long()
        else:
            masks = {t: self._mask4d(seen if w is None else seen & (j > pos[:, None] - w))
                     for t, w in plan.windows.items()}
            model_mask = masks if plan.kind == "dict" else next(iter(masks.values()))
        kv_lens = [x + 1 for x in self.lengths]  # the new token included
        with decode_step(kv_lens, seen[:, None, None, :]):
            yield pos[:, None], model_mask
        self.lengths = kv_lens

    def _mask4d(self, allowed: torch.Tensor) -> torch.Tensor:
        m = allowed[:, None, None, :]
        if not self.masks.additive:
            return m
        zero = torch.zeros((), dtype=self.dtype, device=self.device)
        return torch.where(m, zero, torch.finfo(self.dtype).min)

    # transformers' mask builders (the "2d" plan) ask the cache where keys and the query sit:
    # every row's query comes after all of its keys, and padding is what the 2-D mask removes
    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len, 0

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return self._kv_len - 1

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        n, L = self.n, self._kv_len
        k, v = self.k[layer_idx], self.v[layer_idx]
        k[self._rows, :, self._pos] = key_states[:, :, 0]
        v[self._rows, :, self._pos] = value_states[:, :, 0]
        return k[:n, :, :L], v[:n, :, :L]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len

    @property
    def is_compileable(self) -> bool:
        return False
