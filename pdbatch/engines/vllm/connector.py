"""pdbatch's KV connector for vLLM (`KVConnectorBase_V1`): the door between vLLM's paged KV
cache and pdbatch's KV packets.

vLLM loads it by module path (`KVTransferConfig(kv_connector="PdbatchConnector",
kv_connector_module_path="pdbatch.engines.vllm.connector", kv_role="kv_both",
kv_connector_extra_config={"pdbatch_engine": KEY})`) and makes two instances of it: a
*scheduler* side inside each engine's scheduler, and a *worker* side, which vLLM keeps once
per process (`get_kv_transfer_group()`) even when several engines live in it. pdbatch runs
vLLM in-process (`VLLM_ENABLE_V1_MULTIPROCESSING=0`), so both sides and `VLLMEngine` share
this module's state, one `EngineKV` per engine, keyed by the engine's KEY (which the
scheduler side carries into every step's metadata, so the one worker side always knows whose
cache a step uses).

Per request, `SamplingParams(extra_args={"kv_transfer_params": {...}})` says what to do:
- `{"pdbatch_save": K}` (prefill): once the prompt is computed, copy its KV out of the pages
  into `EngineKV.exports[K]`, shaped like a KV packet `[layers, 2, kv_heads, len, head_dim]`.
- `{"pdbatch_load": K}` (decode): `EngineKV.imports[K]` holds a packet's KV for the first
  `len` prompt tokens; the scheduler side reports those tokens as already computed (minus any
  local prefix-cache hit), and the worker side writes them into the request's fresh blocks
  before the step's forward pass, so vLLM computes only the rest of the prompt.
Loads are synchronous (in the same step, before the forward). Pages are read and written
through `pages.PageLayout` adapters, resolved and verified per engine by `VLLMEngine`.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from .pages import PageLayout, UnsupportedPageLayout, slots_for

SAVE, LOAD = "pdbatch_save", "pdbatch_load"
ENGINE_KEY = "pdbatch_engine"


@dataclass
class EngineKV:
    """What one engine's connector sides and the engine share."""

    key: str
    caches: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> paged cache
    layers: list[tuple[str, PageLayout]] = field(default_factory=list)  # model order, with adapters
    block_size: int = 0
    imports: dict[str, torch.Tensor] = field(default_factory=dict)  # K -> [L, 2, H, n, D]
    exports: dict[str, torch.Tensor] = field(default_factory=dict)
    promised: dict[str, int] = field(default_factory=dict)  # K -> tokens the scheduler counts as loaded
    loaded: dict[str, int] = field(default_factory=dict)  # K -> tokens the worker wrote into pages
    tokens_loaded: int = 0
    tokens_saved: int = 0
    error: str | None = None  # set when the scheduler side cannot serve this engine
    lock: threading.Lock = field(default_factory=threading.Lock)


_ENGINES: dict[str, EngineKV] = {}
_constructing: list[str] = []  # key of the engine whose LLM() is being built (caches registering)
BUILD_LOCK = threading.Lock()  # one LLM() construction (or shutdown) at a time in this process
closed_llms: list = []  # closed engines' vLLM instances, shut down when the last engine closes


def register_engine(key: str) -> EngineKV:
    state = _ENGINES[key] = EngineKV(key)
    return state


def unregister_engine(key: str) -> None:
    _ENGINES.pop(key, None)


def live_engines() -> int:
    return len(_ENGINES)


def _unsupported_cache(kv_cache_config) -> str | None:
    """Why this engine's KV cache cannot be moved, or None: pdbatch moves one group of plain
    full-attention layers, whose blocks hold every token of a request (vLLM frees or reuses
    blocks of sliding-window, chunked-local and hybrid groups, MLA stores a latent)."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    groups = getattr(kv_cache_config, "kv_cache_groups", None) or []
    if len(groups) != 1:
        return (f"the model has {len(groups)} KV cache groups (sliding-window or hybrid attention); "
                f"pdbatch moves vLLM KV only for models with one")
    spec = groups[0].kv_cache_spec
    if type(spec) is not FullAttentionSpec:
        return f"its KV cache is {type(spec).__name__}; pdbatch moves vLLM KV only for FullAttentionSpec"
    return None


@dataclass
class _Copy:
    key: str  # the request's pdbatch_save / pdbatch_load key
    block_ids: list[int]
    start: int  # token positions [start, end)
    end: int


@dataclass
class PdbatchMetadata(KVConnectorMetadata):
    engine: str
    loads: list[_Copy] = field(default_factory=list)
    saves: list[_Copy] = field(default_factory=list)


class PdbatchConnector(KVConnectorBase_V1):
    def __init__(self, vllm_config, role: KVConnectorRole, kv_cache_config=None):
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        self._engine = self._kv_transfer_config.get_from_extra_config(ENGINE_KEY, None)
        self._block_size = vllm_config.cache_config.block_size
        self._loads: dict[str, _Copy] = {}  # request id -> load planned at allocation
        self._saves: dict[str, tuple[str, int]] = {}  # request id -> (key, prompt length) to export
        if role == KVConnectorRole.SCHEDULER:
            state = _ENGINES.get(self._engine)
            if state is not None:
                state.error = _unsupported_cache(kv_cache_config)

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # exports are copied synchronously in the step that computes them

    # ------------------------------------------------------------------ scheduler side
    def _state(self) -> EngineKV | None:
        return _ENGINES.get(self._engine)

    def on_new_request(self, request) -> None:
        params = request.kv_transfer_params or {}
        if SAVE in params:
            self._saves[request.request_id] = (params[SAVE], request.num_prompt_tokens)

    def get_num_new_matched_tokens(self, request, num_computed_tokens: int) -> tuple[int, bool]:
        kv = self._import_of(request)
        if kv is None:
            return 0, False
        # never the whole prompt: vLLM must compute at least its last token to sample from
        loadable = min(int(kv.shape[3]), request.num_prompt_tokens - 1)
        return max(0, loadable - num_computed_tokens), False

    def update_state_after_alloc(self, request, blocks, num_external_tokens: int) -> None:
        if num_external_tokens <= 0:
            return
        kv = self._import_of(request)
        key = request.kv_transfer_params[LOAD]
        loadable = min(int(kv.shape[3]), request.num_prompt_tokens - 1)
        self._loads[request.request_id] = _Copy(key, list(blocks.get_block_ids()[0]),
                                                loadable - num_external_tokens, loadable)
        state = self._state()
        with state.lock:
            state.promised[key] = state.promised.get(key, 0) + num_external_tokens

    def build_connector_meta(self, scheduler_output) -> PdbatchMetadata:
        meta = PdbatchMetadata(engine=self._engine, loads=list(self._loads.values()))
        self._loads.clear()
        if self._saves:
            done_before = {r.req_id: r.num_computed_tokens for r in scheduler_output.scheduled_new_reqs}
            cached = scheduler_output.scheduled_cached_reqs
            done_before.update(zip(cached.req_ids, cached.num_computed_tokens))
            for req_id, n in scheduler_output.num_scheduled_tokens.items():
                if req_id in self._saves and done_before.get(req_id, 0) + n >= self._saves[req_id][1]:
                    key, length = self._saves.pop(req_id)
                    block_ids = list(self._kv_cache_manager.get_block_ids(req_id)[0])
                    meta.saves.append(_Copy(key, block_ids, 0, length))
        return meta

    def request_finished(self, request, block_ids) -> tuple[bool, dict[str, Any] | None]:
        self._saves.pop(request.request_id, None)
        self._loads.pop(request.request_id, None)
        return False, None

    def _import_of(self, request) -> torch.Tensor | None:
        params = request.kv_transfer_params or {}
        state = self._state()
        if LOAD not in params or state is None:
            return None
        with state.lock:
            return state.imports.get(params[LOAD])

    # ------------------------------------------------------------------ worker side
    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        # vLLM keeps one worker-side connector per process: file the caches under the engine
        # being built right now (VLLMEngine holds BUILD_LOCK around LLM())
        key = _constructing[-1] if _constructing else self._engine
        state = _ENGINES.get(key)
        if state is not None:
            state.caches = dict(kv_caches)

    def start_load_kv(self, forward_context, **kwargs) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PdbatchMetadata) or not meta.loads:
            return
        state = _ENGINES[meta.engine]
        for copy in meta.loads:
            with state.lock:
                kv = state.imports[copy.key]
            slots = slots_for(copy.block_ids, state.block_size, copy.start, copy.end)
            for i, (name, layout) in enumerate(state.layers):
                layout.write(state.caches[name], slots, kv[i, :, :, copy.start:copy.end])
            with state.lock:
                state.loaded[copy.key] = state.loaded.get(copy.key, 0) + (copy.end - copy.start)
                state.tokens_loaded += copy.end - copy.start

    def wait_for_layer_load(self, layer_name: str) -> None:
        return

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata, **kwargs) -> None:
        return  # saved whole in wait_for_save, once every layer of the step is computed

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        if not isinstance(meta, PdbatchMetadata) or not meta.saves:
            return
        state = _ENGINES[meta.engine]
        for copy in meta.saves:
            slots = slots_for(copy.block_ids, state.block_size, copy.start, copy.end)
            kv = torch.stack([layout.read(state.caches[name], slots) for name, layout in state.layers])
            if kv.is_cuda:
                torch.cuda.current_stream(kv.device).synchronize()
            with state.lock:
                state.exports[copy.key] = kv
                state.tokens_saved += copy.end - copy.start

    @classmethod
    def get_required_kvcache_layout(cls, vllm_config) -> str | None:
        return None


__all__ = ["PdbatchConnector", "EngineKV", "register_engine", "unregister_engine", "UnsupportedPageLayout"]
