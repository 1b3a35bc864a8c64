"""A model directory as every engine sees it: checked before any worker starts (one-line
UserError), fingerprinted so a decode side refuses KV made by a different model, and the
dtype/device a job asks for resolved the same way whichever engine loads it."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from ..errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


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


def load_config_and_tokenizer(path: str | os.PathLike):
    """(config, tokenizer) of a checked model directory, without its weights: what a workload
    needs (vocabulary, context) from any model, whichever engine will run it."""
    from transformers import AutoConfig, AutoTokenizer

    p = check_model_dir(path)
    try:
        return (AutoConfig.from_pretrained(p, local_files_only=True),
                AutoTokenizer.from_pretrained(p, local_files_only=True))
    except (OSError, ValueError, KeyError, json.JSONDecodeError) as e:
        raise UserError(f"cannot load model config/tokenizer from {path}: {first_line(e)}") from e


def context_length(config, max_model_len: int | None = None) -> int:
    """The model's context window, capped at --max-model-len when given; `config` is a
    transformers config or config.json as a dict."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    ctx = get("max_position_embeddings") or get("n_positions") or 2048
    return int(min(ctx, max_model_len) if max_model_len else ctx)


def vocab_size(config) -> int:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    return int(text.vocab_size)


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
