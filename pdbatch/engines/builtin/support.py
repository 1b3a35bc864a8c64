"""Which transformers models the built-in engine runs exactly, and how its decode step must
build their attention masks.

Prefill runs the model's own forward (its own masks, a full-length DynamicCache); decode runs it
one token per sequence over the slot KV pool, with masks pdbatch builds, because the rows of a
decode batch have different lengths and transformers' mask builders assume one query position
for the whole batch. What a model's forward does with a ready mask, read from the installed
transformers' source (5.x), decides the mask's shape:

- "dict": models that read `config.layer_types` and accept `{"full_attention": m,
  "sliding_attention": m_sw}` (Gemma-2/3, Qwen2/3, Cohere-2, GPT-OSS, ...): one mask per layer
  type, the sliding one windowed.
- "single": models that pick one mask builder for every layer (Llama, Mistral, Mixtral, Phi-3,
  StarCoder2, GPT-2, Falcon with rotary, ...): one 4-D mask, windowed when the model uses
  `config.sliding_window`.
- "2d": models whose ALiBi bias is computed from the 2-D padding mask (BLOOM, Falcon with
  `alibi`): a 2-D mask [rows, kv_len] (right padding), and the cache tells transformers' mask
  builder that every row's query sits after all its keys.

A window W lets position p see keys p-W+1..p (transformers' `sliding_window_overlay`). A 4-D mask
is boolean for SDPA (and pdbatch's decode attention), additive float for eager attention.

`refusal(config, max_model_len)` is what cannot be made exact; the driver calls it before any
worker starts (BuiltinEngine.check_options) and the job stops in one line.
"""

from __future__ import annotations

import inspect
import sys
from dataclasses import dataclass, field

import torch

FULL, SLIDING = "full_attention", "sliding_attention"
DICT_MASKS = "isinstance(causal_mask_mapping := attention_mask, dict)"
# rope types whose frequencies depend on the longest position in the forward pass: a batch
# mixing short and long rows would rotate a short row's keys differently than alone. "dynamic"
# switches past max_position_embeddings only, which pdbatch's context window never exceeds;
# "longrope" (Phi-3 long-context) switches at original_max_position_embeddings.
DYNAMIC_ROPE = ("longrope",)
# model types whose every row's text differs from one-at-a-time transformers for a reason
# pdbatch's decode cannot fix, with the reason
REFUSED_TYPES: dict[str, str] = {}


@dataclass
class MaskPlan:
    kind: str  # "dict" | "single" | "2d"
    windows: dict = field(default_factory=dict)  # layer type -> window (None: full attention)
    additive: bool = False  # eager attention: float mask (0 / dtype min) instead of boolean

    def single_window(self) -> int | None:
        return self.windows.get(SLIDING) if self.kind == "single" else None


def model_class(config):
    from transformers import AutoModelForCausalLM

    mapping = AutoModelForCausalLM._model_mapping
    return mapping[type(config)] if type(config) in mapping else None


def attn_implementation(config) -> str:
    """The best attention implementation the model's class supports: SDPA, else eager."""
    cls = model_class(config)
    return "sdpa" if cls is None or getattr(cls, "_supports_sdpa", False) else "eager"


def _module_source(cls) -> str:
    try:
        return inspect.getsource(sys.modules[cls.__module__])
    except (OSError, TypeError, KeyError):
        return ""


def _uses_alibi(config) -> bool:
    return config.model_type == "bloom" or bool(getattr(config, "alibi", False))


def _all_rope_types(config) -> list[tuple[str, dict]]:
    rp = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if isinstance(rp, dict) and rp and all(isinstance(v, dict) for v in rp.values()):
        return [(str(v.get("rope_type", v.get("type", "default"))), v) for v in rp.values()]
    if isinstance(rp, dict) and rp:
        return [(str(rp.get("rope_type", rp.get("type", "default"))), rp)]
    return []


def refusal(config, max_model_len: int | None = None) -> str | None:
    """Why the built-in engine cannot run this model exactly, or None."""
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    mtype = text.model_type
    if mtype in REFUSED_TYPES:
        return REFUSED_TYPES[mtype]
    cls = model_class(config)
    if cls is None:
        return f"model type {config.model_type!r} has no causal-LM class in transformers"
    gen = getattr(cls, "_supports_default_dynamic_cache", None)
    if gen is not None and not gen():
        return f"{cls.__name__} keeps its own kind of cache (not per-layer keys and values)"
    layer_types = set(getattr(text, "layer_types", None) or [])
    other = layer_types - {FULL, SLIDING}
    if other:
        return f"{cls.__name__} has {', '.join(sorted(other))} layers (only full and sliding-window attention decode exactly here)"
    if getattr(text, "use_bidirectional_attention", False):
        return f"{cls.__name__} is configured with bidirectional attention, not a causal LM"
    if SLIDING in layer_types and DICT_MASKS not in _module_source(cls):
        return f"{cls.__name__} mixes sliding and full layers but takes one mask for all of them"
    ctx = max_model_len or getattr(text, "max_position_embeddings", None) or 0
    for kind, params in _all_rope_types(text):
        if kind in DYNAMIC_ROPE:
            orig = params.get("original_max_position_embeddings") or getattr(
                text, "original_max_position_embeddings", None) or getattr(text, "max_position_embeddings", 0)
            if ctx > orig:
                return (f"its {kind!r} rope scaling changes every position's rotation once a batch holds a "
                        f"sequence longer than {orig} tokens, so batched output would differ from "
                        f"one prompt at a time; pass --max-model-len {orig} to stay below it")
    return None


def mask_plan(model) -> MaskPlan:
    """How the decode step must hand this model its attention mask (see the module doc)."""
    cfg = model.config
    text = cfg.get_text_config(decoder=True)
    additive = cfg._attn_implementation not in ("sdpa", "pdbatch_sdpa")
    if _uses_alibi(text):
        return MaskPlan("2d", {FULL: None}, additive)
    window = getattr(text, "sliding_window", None)
    src = _module_source(type(model))
    if DICT_MASKS in src and getattr(text, "layer_types", None):
        return MaskPlan("dict", {t: (window if t == SLIDING else None) for t in set(text.layer_types)}, additive)
    if window is not None and "create_sliding_window_causal_mask" in src:
        return MaskPlan("single", {SLIDING: window}, additive)
    return MaskPlan("single", {FULL: None}, additive)


@torch.inference_mode()
def probe_kv_shape(model) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) as the model's attention really stores them, read from a
    one-token forward pass (config fields disagree across families: Falcon-7B's multi-query
    layout keeps one KV head whatever `num_kv_heads` says)."""
    from transformers import DynamicCache

    from ...errors import UserError

    dev = next(model.parameters()).device
    cache = DynamicCache()
    ids = torch.zeros(1, 1, dtype=torch.long, device=dev)
    model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True,
          **{cache_kwarg(model): cache})
    shapes = {tuple(layer.keys.shape) for layer in cache.layers} | {tuple(layer.values.shape) for layer in cache.layers}
    if len(shapes) != 1 or len(next(iter(shapes))) != 4:
        raise UserError(f"{type(model).__name__} keeps keys/values of different shapes per layer "
                        f"({sorted(shapes)}); the built-in engine needs one shape: try --engine vllm")
    _, kv_heads, _, head_dim = next(iter(shapes))
    return len(cache.layers), kv_heads, head_dim


def cache_kwarg(model) -> str:
    """The forward's cache argument: `past_key_values` was renamed `cache` in transformers 5.24."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
