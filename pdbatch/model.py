"""Loading a Hugging Face causal LM from a local directory, and the fingerprint that lets the
decode side refuse KV made by a different model."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":  # bf16 where GEMMs are fast in it, fp32 on CPU for exact comparisons
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in table:
        raise UserError(f"unknown dtype {dtype!r} (choose auto, float32, bfloat16, float16)")
    return table[dtype]


def resolve_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def check_model_dir(path: str | os.PathLike) -> Path:
    """A one-line UserError for anything that is not a loadable model directory."""
    p = Path(path)
    if not p.is_dir():
        raise UserError(f"model directory not found: {path}")
    if not (p / "config.json").is_file():
        raise UserError(f"not a Hugging Face model directory (no config.json): {path}")
    if not _weight_files(p):
        raise UserError(f"model directory has no weight files (*.safetensors or *.bin): {path}")
    if not os.access(p / "config.json", os.R_OK):
        raise UserError(f"model directory is not readable: {path}")
    try:  # caught here in one line, not as a traceback from every worker's engine set-up
        with open(p / "config.json", "rb") as f:
            ok = isinstance(json.load(f), dict)
    except ValueError:
        ok = False
    if not ok:
        raise UserError(f"config.json is not a JSON object: {p / 'config.json'}")
    return p


def _weight_files(p: Path) -> list[Path]:
    return sorted(f for f in p.iterdir() if f.is_file() and f.name.endswith(WEIGHT_SUFFIXES)
                  and not f.name.startswith("training_args"))


def model_fingerprint(path: str | os.PathLike) -> str:
    """Hash of config.json and of each weight file's size plus its first and last 64 KiB.

    Cheap even for 100 GB checkpoints, and it tells apart two checkpoints that share a config
    (different seeds or fine-tunes), which a config hash alone would not.
    """
    p = Path(path)
    h = hashlib.sha256((p / "config.json").read_bytes())
    for f in _weight_files(p):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(65536))
            if size > 65536:
                fh.seek(max(size - 65536, 65536))
                h.update(fh.read(65536))
    return h.hexdigest()[:16]


def load_model(path: str, *, dtype: str = "auto", device: str | None = None,
               max_model_len: int | None = None, tuned: bool = True) -> LoadedModel:
    """`tuned=False` gives the model exactly as transformers loads it (for the Hugging Face
    baselines and references that pdbatch is compared with)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # one "Loading weights" bar per worker is noise in job logs

    p = check_model_dir(path)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(p, local_files_only=True)
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load model config/tokenizer from {path}: {_first_line(e)}") from e
    if getattr(config, "is_encoder_decoder", False):
        raise UserError(f"{path} is an encoder-decoder model; pdbatch runs decoder-only causal LMs")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            p, dtype=torch_dtype, local_files_only=True, attn_implementation="sdpa")
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"cannot load model weights from {path}: {_first_line(e)}") from e
    model.to(dev).eval()
    model.requires_grad_(False)
    if tuned and dev.type == "cpu":
        tune_for_cpu(model)

    ctx = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None) or 2048
    if max_model_len:
        ctx = min(ctx, max_model_len)
    return LoadedModel(model=model, tokenizer=tokenizer, fingerprint=model_fingerprint(p),
                       path=str(p), device=dev, dtype=torch_dtype, max_model_len=int(ctx),
                       eos_token_ids=_eos_ids(model, tokenizer))


def tune_for_cpu(model) -> None:
    """Two CPU-only changes that leave every weight value and every result's math as it was:

    - each Linear weight is stored transposed ([in, out] contiguous, seen through a transposed
      view): `F.linear` then runs one plain GEMM instead of one against a transposed operand,
      which single-threaded oneDNN/MKL do 1.2-1.4x faster at decode-sized batches (measured on
      the 30M bench model: decode step at batch 32 52 -> 45 ms). A tied output projection gets
      its own copy, so the input embedding keeps its row-major rows.
    - decode attention reads each sequence's own length rather than the batch's longest
      (`pdbatch.attention`); prefill keeps transformers' SDPA.

    On a GPU neither pays (cuBLAS takes either layout, and one attention launch per layer is
    cheapest there), so GPU models are left as loaded."""
    from . import attention

    for module in model.modules():
        if isinstance(module, torch.nn.Linear) and module.weight.is_contiguous():
            transposed = module.weight.detach().t().contiguous()
            module.weight = torch.nn.Parameter(transposed.t(), requires_grad=False)
    if model.config._attn_implementation == "sdpa":
        model.set_attn_implementation(attention.register())


def _eos_ids(model, tokenizer) -> list[int]:
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
