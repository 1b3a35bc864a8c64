"""The engine seam: the worker side builds one Engine per worker with create_engine and talks to
nothing else (pdbatch.engines.base). Engines are imported only when built, so a driver without
an engine's libraries (torch for builtin, vllm for vllm) still imports this package."""

from __future__ import annotations

from ..errors import UserError
from .base import Engine, EngineStats


def _builtin():
    from .builtin import BuiltinEngine

    return BuiltinEngine


def _vllm():
    from .vllm import VLLMEngine, require_vllm

    require_vllm()  # one line saying what to install, not an ImportError from inside vLLM
    return VLLMEngine


# kind -> a function returning the Engine class
ENGINES = {"builtin": _builtin, "vllm": _vllm}


def engine_class(kind: str) -> type[Engine]:
    if kind not in ENGINES:
        raise UserError(f"unknown engine {kind!r} (choose {', '.join(ENGINES)})")
    return ENGINES[kind]()


def create_engine(kind: str, options: dict, roles, worker_name: str | None = None) -> Engine:
    """The engine of `kind` for a worker with `roles`. `options`: model, dtype, device, mode,
    max_batch_tokens, kv_budget_bytes, max_num_seqs, max_model_len, threads (EngineHost's), and
    `engine` (the kind)."""
    return engine_class(kind)(options, frozenset(roles), worker_name)


__all__ = ["ENGINES", "Engine", "EngineStats", "create_engine", "engine_class"]
