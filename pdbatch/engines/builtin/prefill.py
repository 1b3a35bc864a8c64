"""Prefill engine: length-bucketed batched forward passes that produce the first token and one
KV packet per sequence.

Prompts are sorted by length and packed into batches whose padded size stays under
`max_batch_tokens` and, on a CPU, whose padding stays under a tenth of the pass. Batches are
left-padded with position_ids = cumsum(mask) - 1, which gives every real token the position it
would have alone; the packet then keeps only the real tokens' KV.
"""

from __future__ import annotations

import inspect
import time

import torch
from transformers import DynamicCache

from ...kv.packet import KVPacket
from ..request import Request, SequenceOutput
from ..stopping import StopChecker
from .model import LoadedModel
from .sampler import sample_next


def validate_request(req: Request, max_model_len: int) -> str | None:
    """The row-level problem with a request, or None. Clamps max_new_tokens to the context."""
    try:
        req.params.validate()
    except ValueError as e:
        return str(e)
    n = len(req.prompt_ids)
    if n == 0:
        return "prompt is empty"
    if n >= max_model_len:
        return f"prompt has {n} tokens; the model's context window is {max_model_len} tokens"
    # vLLM-style: generation stops at the context window with finish_reason "length"
    req.params.max_new_tokens = min(req.params.max_new_tokens, max_model_len - n)
    return None


def length_buckets(lengths: list[int], max_batch_tokens: int, max_batch_size: int = 256,
                   max_padding_share: float | None = None) -> list[list[int]]:
    """Indices grouped so that len(batch) * longest <= max_batch_tokens (one prompt at least)
    and, with max_padding_share, padding is at most that share of the batch's padded tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    batches, cur, real = [], [], 0
    for i in order:
        longest = lengths[i]  # sorted ascending: the newcomer is the longest
        padded = (len(cur) + 1) * longest
        if cur and (padded > max_batch_tokens or len(cur) >= max_batch_size or (
                max_padding_share is not None and padded - (real + longest) > max_padding_share * padded)):
            batches.append(cur)
            cur, real = [], 0
        cur.append(i)
        real += longest
    if cur:
        batches.append(cur)
    return batches


def default_max_batch_tokens(device: torch.device) -> int:
    """Prompt tokens per prefill forward pass when none is given. A GPU needs big passes to keep
    its cores busy; a CPU is fastest with passes whose activations stay in cache (measured, 30M
    bench model, one thread: ~1900 prompt tokens/s with 512-1024-token passes, 1650-1450 with
    2048-4096, 1250 with 8192)."""
    return 1024 if device.type == "cpu" else 8192


def default_max_padding_share(device: torch.device) -> float | None:
    """How much of a prefill pass may be padding. On a CPU a padded token costs what a real one
    does, and a pass's fixed cost is small: a 10 % cap made prefill of 10-prompt units 5 % faster
    for 32-512-token prompts and 22 % for 16-64, and left 512-1024 as it was (30M bench model, one
    thread; docs/benchmarks.md). A GPU pass is cheap per padded token and dear per pass: no cap."""
    return 0.1 if device.type == "cpu" else None


class PrefillEngine:
    def __init__(self, lm: LoadedModel, max_batch_tokens: int | None = None, worker_name: str | None = None):
        self.lm = lm
        self.max_batch_tokens = max_batch_tokens or default_max_batch_tokens(lm.device)
        self.max_padding_share = default_max_padding_share(lm.device)
        self.worker_name = worker_name
        self.stops = StopChecker(lm.tokenizer, lm.eos_token_ids)
        params = inspect.signature(lm.model.forward).parameters
        self._logits_to_keep = "logits_to_keep" in params
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self.tokens_done = 0  # prompt tokens prefilled (metrics)
        self.busy_s = 0.0

    def run(self, requests: list[Request]) -> list[KVPacket | SequenceOutput]:
        """One result per request, same order: a KV packet to decode, or a finished/failed row
        (a failed row has `error` set; a row may also finish on its first token)."""
        results: list = [None] * len(requests)
        ok = []
        for i, r in enumerate(requests):
            err = validate_request(r, self.lm.max_model_len)
            if err:
                results[i] = SequenceOutput.failed(r.id, err, len(r.prompt_ids), self.worker_name)
            else:
                ok.append(i)
        lengths = [len(requests[i].prompt_ids) for i in ok]
        buckets = length_buckets(lengths, self.max_batch_tokens, max_padding_share=self.max_padding_share)
        # Every row's first token is out when its pass ends, but its packet leaves with the
        # whole call's: the wait counts in its TPOT, divided over its output tokens. Passes whose
        # rows ask for the fewest tokens go last, so the rows that wait long divide the wait
        # over many tokens (summarize bench: the job's TPOT p99 was 17-20-token rows that had
        # waited ~3 s for the rest of their unit).
        buckets.sort(key=lambda b: -min(requests[ok[j]].params.max_new_tokens for j in b))
        for bucket in buckets:
            idx = [ok[j] for j in bucket]
            batch = [requests[i] for i in idx]
            try:
                outs = self._forward(batch)
            except Exception:  # keep other batches alive; find out which rows fail on their own
                outs = self._one_by_one(batch)
            for i, o in zip(idx, outs):
                results[i] = o
        return results

    def _one_by_one(self, batch: list[Request]) -> list[KVPacket | SequenceOutput]:
        """A batch whose forward raised: each row alone, so one bad row fails only itself."""
        out = []
        for r in batch:
            try:
                out += self._forward([r])
            except Exception as e:
                out.append(SequenceOutput.failed(r.id, f"prefill failed: {type(e).__name__}: {e}",
                                                 len(r.prompt_ids), self.worker_name))
        return out

    @torch.inference_mode()
    def _forward(self, batch: list[Request]) -> list[KVPacket | SequenceOutput]:
        t0 = time.time()
        dev = self.lm.device
        lens = [len(r.prompt_ids) for r in batch]
        T = max(lens)
        ids = torch.zeros(len(batch), T, dtype=torch.long)
        mask = torch.zeros(len(batch), T, dtype=torch.long)
        for b, r in enumerate(batch):
            ids[b, T - lens[b]:] = torch.tensor(r.prompt_ids, dtype=torch.long)
            mask[b, T - lens[b]:] = 1
        ids, mask = ids.to(dev), mask.to(dev)
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        # No config: every layer keeps all its keys and values. With the config, sliding-window
        # layers would keep only their last window (too short for the packet, and decode masks
        # the window itself: support.py).
        cache = DynamicCache()
        kwargs = {self._cache_kw: cache, "use_cache": True}
        if self._logits_to_keep:
            kwargs["logits_to_keep"] = 1
        logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, **kwargs).logits[:, -1]
        first = sample_next(logits, [r.params for r in batch], [0] * len(batch))
        now = time.time()

        keys = torch.stack([layer.keys for layer in cache.layers])  # [L, B, H, T, D]
        values = torch.stack([layer.values for layer in cache.layers])
        out = []
        for b, r in enumerate(batch):
            reason = self.stops.check(r.params, [first[b]])
            if reason:  # finished on its first token: no KV needs to move
                out.append(self.stops.output(r.id, r.params, lens[b], [first[b]], reason,
                                             r.arrival_time, now, now, prefill_worker=self.worker_name))
                continue
            kv = torch.stack((keys[:, b, :, T - lens[b]:], values[:, b, :, T - lens[b]:]), dim=1)
            out.append(KVPacket(seq_id=r.id, prompt_ids=r.prompt_ids, first_token=first[b],
                                kv=kv.contiguous(), fingerprint=self.lm.fingerprint, params=r.params,
                                arrival_time=r.arrival_time, first_token_time=now,
                                prefill_worker=self.worker_name))
        self.tokens_done += sum(lens)
        self.busy_s += time.time() - t0
        return out
