"""Building a VLLMEngine's parts: the Hugging Face side pdbatch itself uses (tokenizer, EOS
ids, fingerprint), the in-process vLLM engine with pdbatch's connector and sampler, and the
page adapters bound to the caches vLLM registered with the connector."""

from __future__ import annotations

import logging
import os
import time
import uuid
from types import SimpleNamespace

from ...errors import UserError
from ..model_dir import model_fingerprint
from . import settings

log = logging.getLogger("pdbatch.vllm")


def hf_side(model: str) -> SimpleNamespace:
    """Tokenizer, EOS ids, vocabulary size and fingerprint, as the built-in engine sees them."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from ..builtin.model import _eos_ids

    tokenizer = AutoTokenizer.from_pretrained(model, local_files_only=True)
    config = AutoConfig.from_pretrained(model, local_files_only=True)
    try:
        gen = GenerationConfig.from_pretrained(model, local_files_only=True)
    except OSError:
        gen = None
    return SimpleNamespace(
        tokenizer=tokenizer, eos_token_ids=_eos_ids(SimpleNamespace(generation_config=gen), tokenizer),
        vocab_size=int(config.get_text_config().vocab_size),
        # ":vllm": KV from this engine and from the built-in one are not interchangeable
        fingerprint=model_fingerprint(model) + ":vllm")


def set_threads(device: str, threads: int) -> int:
    """Torch threads on CPU, set before LLM() (vLLM's CPU worker then disables
    torch.set_num_threads); returns the count the engine's loop thread must use (0 on GPU)."""
    if device != "cpu":
        return 0
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def build_llm(model: str, device: str, options: dict, kv_budget_bytes: int):
    """(vllm.LLM, connector.EngineKV): an in-process engine whose connector state is its own."""
    from vllm import LLM
    from vllm.config import KVTransferConfig

    from . import connector
    from .sampler import PdbatchSampler

    ctx = settings.model_context(model)
    kw = settings.llm_kwargs(
        model, device=device, dtype=options.get("dtype") or "auto",
        max_model_len=min(options.get("max_model_len") or ctx, ctx), max_num_seqs=options.get("max_num_seqs") or 128,
        max_batch_tokens=options.get("max_batch_tokens"), kv_budget_bytes=kv_budget_bytes,
        enforce_eager=options.get("enforce_eager", True), seed=options.get("seed") or 0)
    kw["logits_processors"] = [PdbatchSampler]
    key = uuid.uuid4().hex
    kv = connector.register_engine(key)
    # every pdbatch vLLM engine has the connector, colocated ones too: vLLM keeps one
    # worker-side connector per process and every engine's model runner calls it
    kw["kv_transfer_config"] = KVTransferConfig(
        kv_connector="PdbatchConnector", kv_connector_module_path=connector.__name__,
        kv_role="kv_both", kv_connector_extra_config={connector.ENGINE_KEY: key})
    t0 = time.time()
    # vLLM's CPU platform adds torch's libgomp (and a tcmalloc of its own) to this process's
    # LD_PRELOAD for the engine processes it would start; in-process there are none, and any
    # process started from here later (a test's CLI run) would get two OpenMP runtimes
    preload = os.environ.get("LD_PRELOAD")
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
            if preload is None:
                os.environ.pop("LD_PRELOAD", None)
            else:
                os.environ["LD_PRELOAD"] = preload
    log.info("vLLM engine for %s built in %.1fs (%s, %s)", model, time.time() - t0, device, kw["dtype"])
    return llm, kv


def bind_pages(llm, kv) -> str | None:
    """Resolve and verify a page adapter for every attention layer (pages.py) into `kv`;
    the reason KV cannot be moved for this engine, or None."""
    from vllm.model_executor.models.utils import extract_layer_index

    from . import pages

    if kv.error:
        return kv.error
    vcfg = llm.llm_engine.vllm_config
    context = vcfg.compilation_config.static_forward_context
    names = sorted(kv.caches, key=extract_layer_index)
    if not names:
        return "vLLM registered no KV caches with pdbatch's connector"
    layers = []
    try:
        for name in names:
            cache, layer = kv.caches[name], context[name]
            if tuple(layer.kv_cache.shape) != tuple(cache.shape):
                raise pages.UnsupportedPageLayout(
                    f"vLLM splits its KV blocks for the kernel ({tuple(cache.shape)} -> "
                    f"{tuple(layer.kv_cache.shape)}); pdbatch reads whole blocks only")
            layout = pages.layout_for(layer, cache, vcfg.cache_config.cache_dtype)
            if not layers:
                pages.verify(layout, layer, cache)
            layers.append((name, layout))
    except pages.UnsupportedPageLayout as e:
        return str(e)
    kv.layers = layers
    kv.block_size = int(kv.caches[names[0]].shape[2])
    return None


def vllm_version() -> str:
    import vllm

    return vllm.__version__


def shutdown(llm) -> None:
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:
        log.debug("vLLM engine shutdown raised", exc_info=True)
