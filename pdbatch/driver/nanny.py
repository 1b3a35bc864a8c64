"""The embedded cluster's Nanny: Dask's, with time for an engine's worker to close.

Dask gives a closing worker 5 s (4 s to exit, then SIGKILL and 1 s to be reaped). A pdbatch
worker's exit is slower: the engine's teardown (vLLM's shutdown: about 1 s on an idle 2-core
machine) and the interpreter's exit with a model's heap (about 2.5 s). On a loaded machine
that passes 5 s; the Nanny's close then fails with a TimeoutError that Dask prints as a
traceback, and the cluster's close waits on that Nanny until its own timeout."""

from __future__ import annotations

from distributed import Nanny

WORKER_CLOSE_TIMEOUT_S = 60.0  # SIGKILL after 80% of it; connect()'s cluster close allows more


class JobNanny(Nanny):
    async def close(self, timeout: float = WORKER_CLOSE_TIMEOUT_S, reason: str = "nanny-close"):
        return await super().close(timeout=timeout, reason=reason)
