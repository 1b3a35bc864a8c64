"""Decode engine: a long-lived continuous-batching loop.

KV packets are admitted at any time (FIFO, while the KV budget allows), every active sequence
advances one token per step, and a finished sequence leaves at once so its slot is reused on
the next step. In colocated mode the same loop also runs prefill batches for prompts it was
given, prefill first when there is room, like a single-engine server (vLLM's default policy),
except that while sequences decode a pass waits for a few free slots (PREFILL_MIN_FREE_SHARE).
"""

from __future__ import annotations

import inspect
import threading
import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch

from ...errors import IncompatibleKV
from ...kv.packet import KVPacket
from ..request import Request, SequenceOutput
from ..sampling import SamplingParams
from ..stopping import StopChecker
from .kv_cache import SlotKVCache
from .model import LoadedModel
from .prefill import PrefillEngine, length_buckets, validate_request
from .sampler import sample_next
from .support import mask_plan


@dataclass
class _Seq:
    packet_id: str
    params: SamplingParams
    prompt_len: int
    gen_ids: list[int]
    arrival: float
    first_token_time: float
    prefill_worker: str | None
    kv_bytes: int
    kv_transfer_s: float | None
    future: Future


@dataclass
class DecodeStats:
    steps: int = 0
    tokens: int = 0
    busy_s: float = 0.0
    kv_packets: int = 0
    kv_packets_host_staged: int = 0  # arrived on the host while the engine runs on a GPU
    step_log: list = field(default_factory=list)  # (batch size, seconds) of recent steps

    def record(self, n: int, dt: float) -> None:
        self.steps += 1
        self.tokens += n
        self.busy_s += dt
        self.step_log.append((n, dt))
        if len(self.step_log) > 4096:
            del self.step_log[:2048]


# Colocated mode: how many waiting prompts a prefill batch is chosen from (by length, around the
# oldest). Bounded so that choosing costs O(window) per pass, however long the queue.
PREFILL_WINDOW = 1024
# Colocated mode: while sequences decode, a prefill pass waits for this share of the slots to be
# free (or for every waiting prompt to fit). A slot frees about once a step, so prefilling
# whenever one is free runs one-prompt passes: each pays a pass's fixed cost and leaves nothing
# to group by length (200-prompt engine benchmark, 128 slots: 85 passes, 34 of one prompt, 69-71 s
# -> 61 passes, 66 s, same tokens).
PREFILL_MIN_FREE_SHARE = 1 / 16
# While a prefill pass runs beside this loop on the same CPU cores (a decoder lending its spare
# time to prefill: engines/builtin/priority.py), decode steps take at most this share of the
# time. Prefill is the bottleneck then (every prefill worker is full), and a CPU decode step
# costs nearly as much for 4 rows as for 8 (it reads every weight): run back to back, steps
# of a few rows ate the CPU the prefill needed; spaced, the rows of the next units join the
# running batch and the same tokens take fewer steps.
DECODE_SHARE_BESIDE_PREFILL = 0.5


def kv_shape(lm: LoadedModel) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) as the model's attention actually stores them (probed at
    load: support.probe_kv_shape)."""
    return lm.kv_shape


def kv_bytes_per_token(lm: LoadedModel) -> int:
    """KV cache bytes one token takes in this model: K and V of every layer."""
    layers, kv_heads, head_dim = kv_shape(lm)
    return 2 * layers * kv_heads * head_dim * lm.dtype.itemsize


class DecodeEngine:
    def __init__(self, lm: LoadedModel, *, kv_budget_bytes: int = 1 << 30, max_num_seqs: int = 128,
                 worker_name: str | None = None, prefill: PrefillEngine | None = None):
        self.lm = lm
        self.worker_name = worker_name
        self.prefill = prefill  # set in colocated mode
        self.layers, self.kv_heads, self.head_dim = kv_shape(lm)
        self.cache = SlotKVCache(self.layers, self.kv_heads, self.head_dim, lm.dtype, lm.device,
                                 kv_budget_bytes, max_num_seqs, len_limit=lm.max_model_len,
                                 masks=mask_plan(lm.model))
        self.stops = StopChecker(lm.tokenizer, lm.eos_token_ids)
        self.stats = DecodeStats()
        self.active: list[_Seq] = []  # index == KV slot
        self._packets: deque[tuple[KVPacket, Future, float | None]] = deque()
        self._prompts: deque[tuple[Request, Future]] = deque()
        self._cv = threading.Condition()
        self._stopped = False
        self._beside_prefill = 0  # prefill passes running beside this loop (beside_prefill)
        fwd = inspect.signature(lm.model.forward).parameters
        self._cache_kw = "cache" if "cache" in fwd else "past_key_values"  # renamed in transformers 5.24
        self._thread = threading.Thread(target=self._loop, name="pdbatch-decode", daemon=True)
        self._thread.start()

    # --- public API (thread-safe) ----------------------------------------------------------
    def submit(self, packet: KVPacket, kv_transfer_s: float | None = None) -> Future:
        fut: Future = Future()
        with self._cv:
            self._packets.append((packet, fut, kv_transfer_s))
            self._cv.notify()
        return fut

    def submit_request(self, req: Request) -> Future:
        """Colocated mode: prefill happens inside this engine's loop."""
        if self.prefill is None:
            raise RuntimeError("this decode engine has no prefill engine (disaggregated mode)")
        fut: Future = Future()
        err = validate_request(req, self.lm.max_model_len)
        if err:
            fut.set_result(SequenceOutput.failed(req.id, err, len(req.prompt_ids), self.worker_name))
            return fut
        with self._cv:
            self._prompts.append((req, fut))
            self._cv.notify()
        return fut

    def load(self) -> dict:
        """What the router needs: free KV budget and queue lengths."""
        with self._cv:
            used = self.cache.pool_bytes(self.cache.n, self.cache.max_len)
            return {"active": len(self.active), "queued": len(self._packets) + len(self._prompts),
                    "kv_budget_bytes": self.cache.budget_bytes,
                    "kv_free_bytes": self.cache.budget_bytes - used}

    @contextmanager
    def beside_prefill(self):
        """While this block runs a prefill on the cores this loop decodes on, decode steps take
        at most DECODE_SHARE_BESIDE_PREFILL of the time."""
        with self._cv:
            self._beside_prefill += 1
        try:
            yield
        finally:
            with self._cv:
                self._beside_prefill -= 1
                self._cv.notify()

    def close(self) -> None:
        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=30)

    # --- the loop --------------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopped or self._packets or self._prompts or self.active):
                    self._cv.wait()
                if self._stopped:
                    self._fail_all("decode engine stopped")
                    return
            try:
                self._run_prefill_if_room()
                self._admit()
                if self.active:
                    dt = self._step()
                    if self._beside_prefill:
                        self._yield_to_prefill(dt * (1 / DECODE_SHARE_BESIDE_PREFILL - 1))
            except Exception as e:  # a broken step must not hang the futures waiting on it
                self._fail_all(f"decode failed: {type(e).__name__}: {e}")

    def _yield_to_prefill(self, seconds: float) -> None:
        """Leave the cores to the prefill beside this loop for `seconds`, or until it ends or
        the engine stops."""
        end = time.perf_counter() + seconds
        with self._cv:
            while self._beside_prefill and not self._stopped and (left := end - time.perf_counter()) > 0:
                self._cv.wait(left)

    def _run_prefill_if_room(self) -> None:
        if self.prefill is None:
            return
        with self._cv:
            batch = self._take_prefill_batch()
        if not batch:
            return
        results = self.prefill.run([r for r, _ in batch])
        with self._cv:
            for (req, fut), res in zip(batch, results):
                if isinstance(res, KVPacket):
                    self._packets.appendleft((res, fut, 0.0))
                else:
                    res.decode_worker = self.worker_name
                    fut.set_result(res)

    def _take_prefill_batch(self) -> list[tuple[Request, Future]]:
        """The oldest waiting prompt and its neighbours by length among the next PREFILL_WINDOW
        waiting prompts, as many as the free slots and one pass's token budget (padding
        included) allow. Taken in arrival order alone, a pass would mix 32- and 512-token
        prompts and pay for the padding; the head of the queue is always in the batch, so no
        prompt waits forever. Caller holds self._cv."""
        free_slots = self.cache.max_slots - self.cache.n - len(self._packets)
        if free_slots <= 0 or not self._prompts:
            return []
        min_free = max(1, int(self.cache.max_slots * PREFILL_MIN_FREE_SHARE))
        if self.active and free_slots < min(min_free, len(self._prompts)):
            return []  # let a few more slots free up: one bigger pass instead of many small ones
        head, _ = self._prompts[0]
        if self.active and not self.cache.fits(len(head.prompt_ids) + head.params.max_new_tokens):
            return []  # wait for running sequences to free KV memory
        window = [self._prompts.popleft() for _ in range(min(PREFILL_WINDOW, len(self._prompts)))]
        lengths = [len(req.prompt_ids) for req, _ in window]
        bucket = next(b for b in length_buckets(lengths, self.prefill.max_batch_tokens, free_slots,
                                                 self.prefill.max_padding_share) if 0 in b)
        taken = {i for i in bucket if i == 0 or not self.active or self.cache.fits(
            lengths[i] + window[i][0].params.max_new_tokens)}
        self._prompts.extendleft(reversed([w for i, w in enumerate(window) if i not in taken]))
        return [w for i, w in enumerate(window) if i in taken]

    def _admit(self) -> None:
        with self._cv:
            while self._packets:
                packet, fut, transfer_s = self._packets[0]
                reserve = packet.length + packet.params.max_new_tokens
                try:
                    packet.check_compatible(self.lm.fingerprint, self.lm.dtype, self.layers,
                                            self.kv_heads, self.head_dim)
                    if not self.cache.ever_fits(reserve):
                        raise IncompatibleKV(
                            f"sequence needs {reserve} KV positions "
                            f"({self.cache.pool_bytes(1, reserve) / 2**20:.1f} MiB), over the decode KV "
                            f"budget of {self.cache.budget_bytes / 2**20:.1f} MiB")
                except IncompatibleKV as e:
                    self._packets.popleft()
                    fut.set_result(SequenceOutput.failed(packet.seq_id, str(e), len(packet.prompt_ids),
                                                         packet.prefill_worker))
                    continue
                if not self.cache.fits(reserve):
                    return  # wait for running sequences to finish
                self._packets.popleft()
                self.stats.kv_packets += 1
                if packet.kv.device.type != self.lm.device.type:
                    self.stats.kv_packets_host_staged += 1  # copied up here: not device-to-device
                self.cache.add(packet.kv, reserve)
                self.active.append(_Seq(packet.seq_id, packet.params, packet.length, [packet.first_token],
                                        packet.arrival_time, packet.first_token_time,
                                        packet.prefill_worker, packet.nbytes, transfer_s, fut))

    @torch.inference_mode()
    def _step(self) -> float:
        """One token for every active sequence; returns the step's seconds."""
        t0 = time.perf_counter()
        n = len(self.active)
        ids = torch.tensor([[s.gen_ids[-1]] for s in self.active], dtype=torch.long, device=self.lm.device)
        kw = {self._cache_kw: self.cache}
        with self.cache.step() as (pos, mask):
            logits = self.lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                   **kw).logits[:, -1]
        nxt = sample_next(logits, [s.params for s in self.active], [len(s.gen_ids) for s in self.active])
        now = time.time()
        done = []
        for i, (s, tok) in enumerate(zip(self.active, nxt)):
            s.gen_ids.append(tok)
            reason = self.stops.check(s.params, s.gen_ids)
            if reason:
                done.append((i, reason))
        for i, reason in reversed(done):  # descending: moving the last slot keeps indices valid
            s = self.active[i]
            s.future.set_result(self.stops.output(
                s.packet_id, s.params, s.prompt_len, s.gen_ids, reason, s.arrival, s.first_token_time, now,
                prefill_worker=s.prefill_worker, decode_worker=self.worker_name, kv_bytes=s.kv_bytes,
                kv_transfer_s=s.kv_transfer_s))
            self._drop(i)
        dt = time.perf_counter() - t0
        self.stats.record(n, dt)
        return dt

    def _drop(self, i: int) -> None:
        with self._cv:
            self.cache.remove(i)
            last = self.active.pop()
            if i < len(self.active):
                self.active[i] = last

    def _fail_all(self, why: str) -> None:
        with self._cv:
            pending = [f for _, f, _ in self._packets] + [f for _, f in self._prompts]
            self._packets.clear()
            self._prompts.clear()
            active, self.active = self.active, []
            self.cache.lengths = []
        # An exception, not an error row: the decode task fails and the driver redoes the unit
        # from its prompts (bounded, then row-by-row quarantine). A failed step says nothing
        # about which sequence caused it, so no row is marked failed for good here.
        for f in [s.future for s in active] + pending:
            if not f.done():
                f.set_exception(RuntimeError(why))


def generate(lm: LoadedModel, requests: list[Request], *, colocated: bool = True,
             max_batch_tokens: int | None = None, kv_budget_bytes: int = 1 << 30,
             max_num_seqs: int = 128) -> list[SequenceOutput]:
    """In-process convenience: prefill + decode for a list of requests, outputs in order."""
    prefill = PrefillEngine(lm, max_batch_tokens)
    engine = DecodeEngine(lm, kv_budget_bytes=kv_budget_bytes, max_num_seqs=max_num_seqs,
                          prefill=prefill if colocated else None)
    try:
        if colocated:
            futs = [engine.submit_request(r) for r in requests]
            return [f.result() for f in futs]
        out = []
        for res in prefill.run(requests):
            out.append(engine.submit(res) if isinstance(res, KVPacket) else res)
        return [o.result() if isinstance(o, Future) else o for o in out]
    finally:
        engine.close()


__all__ = ["DecodeEngine", "generate", "kv_bytes_per_token", "kv_shape", "validate_request"]
