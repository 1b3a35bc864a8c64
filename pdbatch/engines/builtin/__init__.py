"""pdbatch's own engine behind the seam: a transformers model (model.py), length-bucketed prefill
(prefill.py) and a continuous-batching decode loop over a slot KV cache (decode.py, kv_cache.py,
attention.py), sharing one loaded model when a worker has both roles."""

from __future__ import annotations

from concurrent.futures import Future

import torch

from ..base import RECENT_STEPS, Engine, EngineStats
from .decode import DecodeEngine
from .model import load_model
from .prefill import PrefillEngine
from .priority import LowPriorityPrefill


class BuiltinEngine(Engine):
    kind = "builtin"

    def __init__(self, options: dict, roles: frozenset[str], worker_name: str | None = None):
        o = options
        if o.get("threads"):
            torch.set_num_threads(o["threads"])
        # dask-cuda pins each worker to one GPU (CUDA_VISIBLE_DEVICES), so "cuda" means that GPU
        self.lm = load_model(o["model"], dtype=o["dtype"], device=o["device"],
                             max_model_len=o["max_model_len"] or None)
        self.roles, self.worker_name = frozenset(roles), worker_name
        self.tokenizer = self.lm.tokenizer
        self.vocab_size = int(self.lm.model.get_input_embeddings().num_embeddings)  # input embedding rows
        self.max_model_len = self.lm.max_model_len
        self.prefill_engine = self.decode_engine = None
        if "prefill" in self.roles:
            self.prefill_engine = PrefillEngine(self.lm, o["max_batch_tokens"], worker_name=worker_name)
        if "decode" in self.roles:  # colocated: the decode loop runs the prefill passes too
            self.decode_engine = DecodeEngine(
                self.lm, kv_budget_bytes=o["kv_budget_bytes"], max_num_seqs=o["max_num_seqs"],
                worker_name=worker_name, prefill=self.prefill_engine if o["mode"] == "colocated" else None)
        # both roles, disaggregated (rebalancing), on CPU: prefill yields the cores to decode (priority.py)
        self.prefills_beside_decode = (self.roles == {"prefill", "decode"} and o["mode"] != "colocated"
                                       and self.lm.device.type == "cpu")
        self._low_priority = LowPriorityPrefill() if self.prefills_beside_decode else None

    @classmethod
    def check_options(cls, options: dict) -> None:
        """A model this engine cannot decode exactly is refused before any worker starts."""
        from .model import check_supported

        check_supported(options["model"], options.get("max_model_len") or None)

    def __str__(self) -> str:  # the worker's "ready" log line
        return f"{self.lm.device}, {self.lm.dtype}"

    def prefill(self, requests):
        if self.prefill_engine is None:
            raise RuntimeError(f"worker {self.worker_name} has no prefill role")
        if self._low_priority is not None:  # decode yields part of the cores meanwhile (decode.py)
            with self.decode_engine.beside_prefill():
                return self._low_priority.run(self.prefill_engine.run, requests)
        return self.prefill_engine.run(requests)

    def submit_packet(self, packet, kv_transfer_s: float | None = None) -> Future:
        return self._decode().submit(packet, kv_transfer_s)

    def submit_request(self, request) -> Future:
        return self._decode().submit_request(request)

    def load(self) -> dict:
        if self.decode_engine is None:
            return {"active": 0, "queued": 0, "kv_budget_bytes": 0, "kv_free_bytes": 0}
        return self.decode_engine.load()

    def stats(self) -> EngineStats:
        s = EngineStats()
        if self.prefill_engine is not None:
            s.prefill_tokens, s.prefill_busy_s = self.prefill_engine.tokens_done, self.prefill_engine.busy_s
        if self.decode_engine is not None:
            d, cache = self.decode_engine.stats, self.decode_engine.cache
            s.decode_steps, s.decode_tokens, s.decode_busy_s = d.steps, d.tokens, d.busy_s
            s.recent_step_s = [dt for _, dt in d.step_log[-RECENT_STEPS:]]
            s.kv_packets, s.kv_packets_host_staged = d.kv_packets, d.kv_packets_host_staged
            s.kv_pool_peak_bytes, s.kv_budget_bytes = cache.peak_bytes, cache.budget_bytes
        return s

    def close(self) -> None:
        if self.decode_engine is not None:
            self.decode_engine.close()
        if self._low_priority is not None:
            self._low_priority.close()

    def _decode(self) -> DecodeEngine:
        if self.decode_engine is None:
            raise RuntimeError(f"worker {self.worker_name} has no decode role")
        return self.decode_engine


__all__ = ["BuiltinEngine"]
