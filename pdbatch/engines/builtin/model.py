"""The built-in engine's model: a Hugging Face causal LM loaded from a local directory with
transformers, tuned for CPU where that pays. The checks and the fingerprint any engine shares
live in pdbatch.engines.model_dir."""

from __future__ import annotations

import json
from dataclasses import dataclass

import torch

from ...errors import UserError
from ..model_dir import (check_model_dir, context_length, first_line, load_config_and_tokenizer, model_fingerprint,
                         resolve_device, resolve_dtype)
from . import support


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    fingerprint: str
    path: str
    device: torch.device
    dtype: torch.dtype
    max_model_len: int
    eos_token_ids: list[int]
    kv_shape: tuple[int, int, int] = (0, 0, 0)  # (layers, kv_heads, head_dim) as stored (support.py)


def load_model(path: str, *, dtype: str = "auto", device: str | None = None,
               max_model_len: int | None = None, tuned: bool = True, builtin_exact: bool = True) -> LoadedModel:
    """`tuned=False` gives the model exactly as transformers loads it (for the Hugging Face
    baselines and references that pdbatch is compared with); `builtin_exact=False` loads a
    model the built-in engine refuses (support.refusal) too, for baselines beside another engine."""
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in job logs

    p = check_model_dir(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    config, tokenizer = load_config_and_tokenizer(p)
    if builtin_exact:
        _check_config(path, config, max_model_len)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=torch_dtype, local_files_only=True, attn_implementation=support.attn_implementation(config))
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load model weights from {path}: {first_line(e)}") from e
    model.to(dev).eval()
    model.requires_grad_(False)
    shape = support.probe_kv_shape(model)
    if tuned and dev.type == "cpu":
        tune_for_cpu(model)

    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=model_fingerprint(p),
                       path=str(p), device=dev, dtype=torch_dtype, max_model_len=context_length(config, max_model_len),
                       eos_token_ids=_eos_ids(model, tokenizer), kv_shape=shape)


def refusal_line(path: str, why: str) -> str:
    return (f"the built-in engine cannot run {path} exactly: {why}; "
            f"use another model or another engine (e.g. --engine vllm)")


def check_supported(path: str, max_model_len: int | None = None) -> None:
    """Raise UserError (one line) if the built-in engine would refuse this model; reads only its
    config, so the driver can ask before any worker starts."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # config warnings would break the one-line refusal
    try:
        config = AutoConfig.from_pretrained(check_model_dir(path), local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load model config from {path}: {first_line(e)}") from e
    finally:
        hf_logging.set_verbosity(level)
    _check_config(path, config, max_model_len)


def _check_config(path: str, config, max_model_len: int | None) -> None:
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{path} is an encoder-decoder model; pdbatch runs decoder-only causal LMs")
    why = support.refusal(config, max_model_len)
    if why:
        raise UserError(refusal_line(path, why))


def tune_for_cpu(model) -> None:
    """Two CPU-only changes that leave every weight value and every result's math as it was:

    - each Linear weight is stored transposed ([in, out] contiguous, seen through a transposed
      view): `F.linear` then runs one plain GEMM instead of one against a transposed operand,
      which single-threaded oneDNN/MKL do 1.2-1.4x faster at decode-sized batches (measured on
      the 30M bench model: decode step at batch 32 52 -> 45 ms). A tied output projection gets
      its own copy, so the input embedding keeps its row-major rows.
    - decode attention reads each sequence's own length rather than the batch's longest
      (`pdbatch.engines.builtin.attention`); prefill keeps transformers' SDPA.

    On a GPU neither pays (cuBLAS takes either layout, and one attention launch per layer is
    cheapest there), so GPU models are left as loaded."""
    from . import attention

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
            transposed = module.weight.detach().t().contiguous()
            module.weight = torch.nn.Parameter(transposed.t(), requires_grad=False)
    # (classes with their own attention code, e.g. Falcon, keep it: only SDPA-interface models switch)
    if model.config._attn_implementation == "sdpa" and model._can_set_attn_implementation():
        model.set_attn_implementation(attention.register())


def _eos_ids(model, tokenizer) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
