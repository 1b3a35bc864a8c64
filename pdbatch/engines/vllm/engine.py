"""VLLMEngine: one in-process vLLM engine per worker, driven by one background thread.

The thread owns vLLM's request/step loop (`LLMEngine.add_request`, `step`): callers on any
thread hand it work through `prefill`, `submit_packet` and `submit_request` and get
`concurrent.futures.Future`s back, so rows from any number of units batch together in vLLM's
scheduler (continuous batching, prefill chunks mixed into decode steps).

Three kinds of vLLM request, one per pdbatch phase:
- prefill: the prompt with max_tokens=1; the connector exports the prompt's KV once computed,
  and the row becomes a KVPacket (or a finished row, when its first token already ends it);
- decode: the prompt plus the packet's first token, with the packet's KV imported for the
  prompt, so vLLM computes one token (the first token's) before it samples the second;
- generate (colocated): the prompt, both phases inside this engine.

Stopping and the row's text follow pdbatch's StopChecker (vLLM semantics, identical to the
built-in engine): EOS and stop ids are handed to vLLM so it stops there itself; stop strings
are checked on the tokens as they arrive (vLLM's own check would not see a first token that
came in the decode prompt), and the request is aborted at the first match.
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
import uuid
from collections import deque
from concurrent.futures import Future
from dataclasses import dataclass, field

from ...errors import IncompatibleKV, UserError
from ...kv_packet import KVPacket
from ...model import model_fingerprint
from ...prefill import validate_request
from ...sampling import SamplingParams
from ...sequence import Request, SequenceOutput
from ...stopping import StopChecker
from . import settings

log = logging.getLogger("pdbatch.vllm")

PREFILL, DECODE, GENERATE = "prefill", "decode", "generate"
BOTH = frozenset({"prefill", "decode"})


@dataclass
class _Row:
    kind: str
    rid: str  # vLLM request id (unique in this engine)
    seq_id: str
    params: SamplingParams
    prompt_ids: list[int]
    future: Future
    arrival: float
    gen_ids: list[int] = field(default_factory=list)
    first_token_time: float | None = None
    prefill_worker: str | None = None
    kv_bytes: int = 0
    kv_transfer_s: float | None = None
    key: str | None = None  # connector key (pdbatch_save / pdbatch_load)
    num_cached_tokens: int | None = None  # vLLM's count of prompt tokens it did not compute


@dataclass
class VLLMStats:
    steps: int = 0
    busy_s: float = 0.0
    prompt_tokens: int = 0  # prompt tokens vLLM computed (cached / imported ones excluded)
    generated_tokens: int = 0
    kv_packets_out: int = 0
    kv_packets_in: int = 0
    kv_packets_host_staged: int = 0
    step_log: list = field(default_factory=list)  # (requests in the step, seconds)

    def record(self, n: int, dt: float) -> None:
        self.steps += 1
        self.busy_s += dt
        self.step_log.append((n, dt))
        if len(self.step_log) > 4096:
            del self.step_log[:2048]


class VLLMEngine:
    kind = "vllm"

    def __init__(self, model: str, *, roles=BOTH, worker_name: str | None = None, dtype: str = "auto",
                 device: str = "auto", max_model_len: int = 0, max_num_seqs: int = 128,
                 max_batch_tokens: int | None = None, kv_budget_bytes: int = 1 << 30,
                 enforce_eager: bool = False, seed: int = 0, threads: int = 0):
        self.roles = frozenset(roles)
        self.worker_name = worker_name
        self.device = settings.resolve_device(device)
        settings.check_model(model, self.device)
        self.path = str(model)
        self.kv_budget_bytes = int(kv_budget_bytes)
        self.stats = VLLMStats()
        self._load_hf_side(model)
        self._llm, self._kv = self._build(model, dtype=dtype, max_model_len=max_model_len,
                                          max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                                          enforce_eager=enforce_eager, seed=seed, threads=threads)
        self._core = self._llm.llm_engine
        mc = self._core.model_config
        self.max_model_len = int(mc.max_model_len)
        self.dtype = mc.dtype
        self.layers = mc.get_num_layers(self._core.vllm_config.parallel_config)
        self.kv_heads = mc.get_total_num_kv_heads()
        self.head_dim = mc.get_head_size()
        self._ids = itertools.count()
        self._inbox: deque = deque()
        self._rows: dict[str, _Row] = {}
        self._cv = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._loop, name="pdbatch-vllm", daemon=True)
        self._thread.start()

    # --- construction ----------------------------------------------------------------------
    def _load_hf_side(self, model: str) -> None:
        """Tokenizer, EOS ids, vocabulary size and fingerprint, as the built-in engine sees them."""
        from transformers import AutoConfig, AutoTokenizer, GenerationConfig

        from ...model import _eos_ids

        self.tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
        config = AutoConfig.from_pretrained(model, local_files_only=True)
        try:
            gen = GenerationConfig.from_pretrained(model, local_files_only=True)
        except OSError:
            gen = None
        self.eos_token_ids = _eos_ids(_HasGenerationConfig(gen), self.tokenizer)
        self.vocab_size = int(getattr(config.get_text_config(), "vocab_size"))
        # ":vllm": KV from this engine and from the built-in one are not interchangeable
        self.fingerprint = model_fingerprint(model) + ":vllm"
        self.stops = StopChecker(self.tokenizer, self.eos_token_ids)

    def _build(self, model, *, dtype, max_model_len, max_num_seqs, max_batch_tokens, enforce_eager, seed,
               threads):
        import torch

        from . import connector

        settings.prepare_process_env()
        if threads and self.device == "cpu":
            torch.set_num_threads(threads)  # before LLM(): vLLM's CPU worker disables it afterwards
        from vllm import LLM
        from vllm.config import KVTransferConfig

        from .sampler import PdbatchSampler

        ctx = settings.model_context(model)
        kw = settings.llm_kwargs(model, device=self.device, dtype=dtype,
                                 max_model_len=min(max_model_len or ctx, ctx),
                                 max_num_seqs=max_num_seqs, max_batch_tokens=max_batch_tokens,
                                 kv_budget_bytes=self.kv_budget_bytes, enforce_eager=enforce_eager, seed=seed)
        kw["logits_processors"] = [PdbatchSampler]
        key = uuid.uuid4().hex
        kv = connector.register_engine(key)
        # every pdbatch vLLM engine has the connector, colocated ones too: vLLM keeps one
        # worker-side connector per process and every engine's model runner calls it
        kw["kv_transfer_config"] = KVTransferConfig(
            kv_connector="PdbatchConnector", kv_connector_module_path=connector.__name__,
            kv_role="kv_both", kv_connector_extra_config={connector.ENGINE_KEY: key})
        t0 = time.time()
        with connector.BUILD_LOCK:
            connector._constructing.append(key)
            try:
                llm = LLM(**kw)
            except Exception as e:
                connector.unregister_engine(key)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise UserError(f"vLLM cannot run {model}: {first}") from e
            finally:
                connector._constructing.remove(key)
        try:
            self._bind_pages(llm, kv)
        except Exception:
            _shutdown(llm)
            connector.unregister_engine(key)
            raise
        log.info("vLLM engine for %s built in %.1fs (%s, %s)", model, time.time() - t0, self.device, kw["dtype"])
        return llm, kv

    @staticmethod
    def _bind_pages(llm, kv) -> None:
        """Resolve and verify a page adapter for every attention layer (pages.py)."""
        from vllm.model_executor.models.utils import extract_layer_index

        from . import pages

        if kv.error:
            raise UserError(f"--engine vllm cannot move KV for this model: {kv.error}")
        vcfg = llm.llm_engine.vllm_config
        context = vcfg.compilation_config.static_forward_context
        names = sorted(kv.caches, key=extract_layer_index)
        if not names:
            raise UserError("vLLM registered no KV caches with pdbatch's connector")
        layers = []
        for name in names:
            cache = kv.caches[name]
            layer = context[name]
            if tuple(layer.kv_cache.shape) != tuple(cache.shape):
                raise pages.UnsupportedPageLayout(
                    f"vLLM splits its KV blocks for the kernel ({tuple(cache.shape)} -> "
                    f"{tuple(layer.kv_cache.shape)}); pdbatch reads whole blocks only")
            layout = pages.layout_for(layer, cache, vcfg.cache_config.cache_dtype)
            if not layers:
                pages.verify(layout, layer, cache)
            layers.append((name, layout))
        kv.layers = layers
        kv.block_size = int(kv.caches[names[0]].shape[2])

    # --- public API (thread-safe) ----------------------------------------------------------
    def prefill(self, requests: list[Request]) -> list[KVPacket | SequenceOutput]:
        futs = [self._submit(PREFILL, r) for r in requests]
        return [f.result() for f in futs]

    def submit_packet(self, packet: KVPacket, kv_transfer_s: float | None = None) -> Future:
        return self._submit(DECODE, packet, kv_transfer_s)

    def submit_request(self, request: Request) -> Future:
        return self._submit(GENERATE, request)

    def load(self) -> dict:
        with self._cv:
            active, queued = len(self._rows), len(self._inbox)
        usage = _kv_usage(self._core)
        return {"active": active, "queued": queued, "kv_budget_bytes": self.kv_budget_bytes,
                "kv_free_bytes": int(self.kv_budget_bytes * (1.0 - usage))}

    def kv_counters(self) -> dict:
        """The connector's own counts: prompt tokens written into / read out of vLLM's pages."""
        return {"tokens_loaded": self._kv.tokens_loaded, "tokens_saved": self._kv.tokens_saved}

    def close(self) -> None:
        from vllm.distributed.kv_transfer import kv_transfer_state

        from . import connector

        with self._cv:
            self._stopped = True
            self._cv.notify()
        self._thread.join(timeout=60)
        # vLLM drops the process's one worker-side connector when any engine shuts down; keep
        # it for the engines still running here (it serves each by its key)
        agent = kv_transfer_state._KV_CONNECTOR_AGENT
        _shutdown(self._llm)
        connector.unregister_engine(self._kv.key)
        if connector.live_engines() and agent is not None:
            kv_transfer_state._KV_CONNECTOR_AGENT = agent

    # --- the loop --------------------------------------------------------------------------
    def _submit(self, kind: str, item, kv_transfer_s: float | None = None) -> Future:
        fut: Future = Future()
        with self._cv:
            if self._stopped:
                raise RuntimeError("vLLM engine is closed")
            self._inbox.append((kind, item, fut, kv_transfer_s))
            self._cv.notify()
        return fut

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not (self._stopped or self._inbox or self._rows):
                    self._cv.wait()
                if self._stopped:
                    break
                new = list(self._inbox)
                self._inbox.clear()
            for kind, item, fut, transfer_s in new:
                try:
                    self._add(kind, item, fut, transfer_s)
                except Exception as e:  # not a row problem (those become error rows in _add)
                    log.exception("vLLM engine could not take a request")
                    if not fut.done():
                        fut.set_exception(RuntimeError(f"vLLM engine failed: {type(e).__name__}: {e}"))
            try:
                if self._rows:
                    self._step()
            except Exception as e:  # a broken step must not hang the futures waiting on it
                log.exception("vLLM engine step failed")
                self._fail_all(f"vLLM engine failed: {type(e).__name__}: {e}")
        self._fail_all("vLLM engine stopped")

    def _add(self, kind: str, item, fut: Future, transfer_s: float | None) -> None:
        from vllm.inputs import TokensPrompt

        rid = f"{kind[0]}{next(self._ids)}"
        if kind == DECODE:
            p: KVPacket = item
            row = _Row(kind, rid, p.seq_id, p.params, list(p.prompt_ids), fut, p.arrival_time,
                       gen_ids=[p.first_token], first_token_time=p.first_token_time,
                       prefill_worker=p.prefill_worker, kv_bytes=p.nbytes, kv_transfer_s=transfer_s, key=rid)
            try:
                p.check_compatible(self.fingerprint, self.dtype, self.layers, self.kv_heads, self.head_dim)
            except IncompatibleKV as e:
                return fut.set_result(SequenceOutput.failed(p.seq_id, str(e), len(p.prompt_ids), p.prefill_worker))
            prompt = row.prompt_ids + [p.first_token]
            max_tokens = p.params.max_new_tokens - 1
        else:
            r: Request = item
            err = validate_request(r, self.max_model_len)
            if err:
                return fut.set_result(SequenceOutput.failed(r.id, err, len(r.prompt_ids), self.worker_name))
            row = _Row(kind, rid, r.id, r.params, list(r.prompt_ids), fut, r.arrival_time,
                       prefill_worker=self.worker_name, key=rid if kind == PREFILL else None)
            prompt = row.prompt_ids
            max_tokens = 1 if kind == PREFILL else r.params.max_new_tokens
            bad = [t for t in prompt if not 0 <= t < self.vocab_size]
            if bad:  # vLLM checks ids only with its tokenizer loaded; a bad id fails a whole step
                return fut.set_result(SequenceOutput.failed(
                    r.id, f"token id {bad[0]} is out of the model's vocabulary ({self.vocab_size} ids)",
                    len(r.prompt_ids), self.worker_name))
        if max_tokens < 1:  # a packet whose row wanted one token only (prefill finishes those)
            return self._finish(row, "length", time.time())
        try:
            sp = self._vllm_params(row, max_tokens)
        except Exception as e:  # vLLM's SamplingParams validation (VLLMValidationError)
            return fut.set_result(self._refused(row, e))
        if kind == DECODE:
            with self._kv.lock:
                self._kv.imports[rid] = item.kv
            if item.kv.device.type != self.device:
                self.stats.kv_packets_host_staged += 1
            self.stats.kv_packets_in += 1
        try:
            self._core.add_request(rid, TokensPrompt(prompt_token_ids=prompt), sp)
        except Exception as e:  # vLLM's request validation: this row's error, not the engine's
            self._forget_kv(row)
            return fut.set_result(self._refused(row, e))
        self._rows[rid] = row

    def _vllm_params(self, row: _Row, max_tokens: int):
        """vLLM's SamplingParams for a row: always greedy for vLLM itself; a row that samples
        has pdbatch's sampler pick its tokens (sampler.py), so no vLLM seed is used."""
        from vllm.sampling_params import RequestOutputKind
        from vllm.sampling_params import SamplingParams as VSamplingParams

        from .sampler import KEY, sampling_args

        p = row.params
        extra = {}
        if row.kind == PREFILL:
            extra["kv_transfer_params"] = {"pdbatch_save": row.key}
        elif row.kind == DECODE:
            extra["kv_transfer_params"] = {"pdbatch_load": row.key}
        if not p.greedy:
            extra[KEY] = sampling_args(p, first_step=1 if row.kind == DECODE else 0)
        stop_ids = list(p.stop_token_ids) + ([] if p.ignore_eos else list(self.eos_token_ids))
        return VSamplingParams(temperature=0.0, max_tokens=int(max_tokens), ignore_eos=True,
                               stop_token_ids=stop_ids, detokenize=False, output_kind=RequestOutputKind.DELTA,
                               extra_args=extra or None)

    def _step(self) -> None:
        t0 = time.perf_counter()
        n = len(self._rows)
        outputs = self._core.step()
        now = time.time()
        for out in outputs:
            row = self._rows.get(out.request_id)
            if row is None:
                continue
            if row.num_cached_tokens is None and out.num_cached_tokens is not None:
                row.num_cached_tokens = int(out.num_cached_tokens)
                self.stats.prompt_tokens += len(out.prompt_token_ids or ()) - row.num_cached_tokens
            self._on_output(row, out, now)
        self.stats.record(n, time.perf_counter() - t0)

    def _on_output(self, row: _Row, out, now: float) -> None:
        comp = out.outputs[0]
        new = list(comp.token_ids)
        self.stats.generated_tokens += len(new)
        if row.kind == DECODE and new and not self._import_was_used(row):
            return self._drop(row, SequenceOutput.failed(
                row.seq_id, "KV import did not run: vLLM's scheduler counted imported tokens that the "
                "connector never wrote", len(row.prompt_ids), row.prefill_worker), abort=not out.finished)
        if row.kind == PREFILL:
            if not new:
                if out.finished:
                    self._drop(row, self._failed(row, f"prefill ended without a token ({comp.finish_reason})"))
                return
            return self._packet(row, new[0], now)
        if new and row.first_token_time is None:
            row.first_token_time = now
        for tok in new:
            row.gen_ids.append(tok)
            reason = self.stops.check(row.params, row.gen_ids)
            if reason:
                return self._finish(row, reason, now, abort=not out.finished)
        if out.finished:  # vLLM stopped without a pdbatch reason: abort, or a limit of its own
            if comp.finish_reason == "length" and row.gen_ids:
                return self._finish(row, "length", now)
            self._drop(row, self._failed(row, f"vLLM ended the request ({comp.finish_reason})"))

    def _import_was_used(self, row: _Row) -> bool:
        """Every token the scheduler side promised to import was written by the worker side (a
        promise without the write would decode from blank pages: wrong text, no error)."""
        with self._kv.lock:
            return self._kv.loaded.get(row.key, 0) >= self._kv.promised.get(row.key, 0)

    def _packet(self, row: _Row, first: int, now: float) -> None:
        reason = self.stops.check(row.params, [first])
        if reason:  # finished on its first token: no KV needs to move
            row.gen_ids, row.first_token_time = [first], now
            return self._finish(row, reason, now)
        with self._kv.lock:
            kv = self._kv.exports.pop(row.key, None)
        if kv is None or kv.shape[3] != len(row.prompt_ids):
            return self._drop(row, self._failed(row, "vLLM computed the prompt but the connector exported no KV"))
        self.stats.kv_packets_out += 1
        packet = KVPacket(seq_id=row.seq_id, prompt_ids=row.prompt_ids, first_token=first, kv=kv.contiguous(),
                          fingerprint=self.fingerprint, params=row.params, arrival_time=row.arrival,
                          first_token_time=now, prefill_worker=self.worker_name)
        self._drop(row, packet)

    def _finish(self, row: _Row, reason: str, now: float, abort: bool = False) -> None:
        decode_worker = self.worker_name if row.kind != PREFILL else None
        self._drop(row, self.stops.output(
            row.seq_id, row.params, len(row.prompt_ids), row.gen_ids, reason, row.arrival,
            row.first_token_time or now, now, prefill_worker=row.prefill_worker, decode_worker=decode_worker,
            kv_bytes=row.kv_bytes, kv_transfer_s=row.kv_transfer_s), abort=abort)

    def _refused(self, row: _Row, e: Exception) -> SequenceOutput:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        return self._failed(row, f"vLLM refused the request: {first}")

    def _failed(self, row: _Row, why: str) -> SequenceOutput:
        return SequenceOutput.failed(row.seq_id, why, len(row.prompt_ids), row.prefill_worker)

    def _drop(self, row: _Row, result, abort: bool = False) -> None:
        if abort:
            self._core.abort_request([row.rid])
        self._rows.pop(row.rid, None)
        self._forget_kv(row)
        if not row.future.done():
            row.future.set_result(result)

    def _forget_kv(self, row: _Row) -> None:
        if row.key is None:
            return
        with self._kv.lock:
            self._kv.imports.pop(row.key, None)
            self._kv.exports.pop(row.key, None)
            self._kv.loaded.pop(row.key, None)
            self._kv.promised.pop(row.key, None)

    def _fail_all(self, why: str) -> None:
        with self._cv:
            pending = [f for _, _, f, _ in self._inbox]
            self._inbox.clear()
        rows, self._rows = list(self._rows.values()), {}
        if rows:
            try:
                self._core.abort_request([r.rid for r in rows])
            except Exception:
                pass
        for r in rows:
            self._forget_kv(r)
        # an exception, not an error row: the driver redoes the unit (as the built-in engine)
        for f in [r.future for r in rows] + pending:
            if not f.done():
                f.set_exception(RuntimeError(why))


class _HasGenerationConfig:
    def __init__(self, generation_config):
        self.generation_config = generation_config


def _kv_usage(core) -> float:
    """Share of vLLM's KV blocks in use (0 when it cannot be read)."""
    try:
        return float(core.engine_core.engine_core.scheduler.kv_cache_manager.usage)
    except AttributeError:
        return 0.0


def _shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        log.debug("vLLM engine shutdown raised", exc_info=True)
