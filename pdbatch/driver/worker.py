"""What lives inside each Dask worker: the model, loaded once, and the engines for its role.

A worker's role comes from the resources it was started with (`prefill=1`, `decode=1`), fixed
at start (changing resources on a live worker corrupts the scheduler's counts, dask#6677). The
plugin is registered once by the driver and Dask runs its setup on every worker, including
workers that join mid-job, so scaling a role needs no restart.
"""

from __future__ import annotations

import logging
import time

from distributed import WorkerPlugin, get_worker

PLUGIN_NAME = "pdbatch-engines"
log = logging.getLogger("pdbatch.worker")


def worker_roles(resources: dict) -> set[str]:
    return {r for r in ("prefill", "decode") if resources.get(r, 0) > 0}


class EngineHost(WorkerPlugin):
    name = PLUGIN_NAME

    def __init__(self, *, model: str, dtype: str, device: str, mode: str, max_batch_tokens: int,
                 kv_budget_bytes: int, max_num_seqs: int, max_model_len: int, threads: int):
        self.options = dict(model=model, dtype=dtype, device=device, mode=mode,
                            max_batch_tokens=max_batch_tokens, kv_budget_bytes=kv_budget_bytes,
                            max_num_seqs=max_num_seqs, max_model_len=max_model_len, threads=threads)
        self.prefill = None
        self.decode = None
        self.roles: set[str] = set()

    def setup(self, worker) -> None:
        import torch

        from ..engines.builtin.decode import DecodeEngine
        from ..engines.builtin.model import load_model
        from ..engines.builtin.prefill import PrefillEngine

        o = self.options
        if o["threads"]:
            torch.set_num_threads(o["threads"])
        t0 = time.time()
        # dask-cuda pins each worker to one GPU (CUDA_VISIBLE_DEVICES), so "cuda" means that GPU
        lm = load_model(o["model"], dtype=o["dtype"], device=o["device"],
                        max_model_len=o["max_model_len"] or None)
        name = str(worker.name)
        # colocated: every worker runs both phases; disaggregated: what its resources say
        self.roles = {"prefill", "decode"} if o["mode"] == "colocated" else \
            worker_roles(worker.state.total_resources)
        if "prefill" in self.roles:
            self.prefill = PrefillEngine(lm, o["max_batch_tokens"], worker_name=name)
        if "decode" in self.roles:
            self.decode = DecodeEngine(lm, kv_budget_bytes=o["kv_budget_bytes"], max_num_seqs=o["max_num_seqs"],
                                       worker_name=name,
                                       prefill=self.prefill if o["mode"] == "colocated" else None)
        log.info("pdbatch worker %s ready as %s in %.1fs (%s, %s)", name, "+".join(sorted(self.roles)),
                 time.time() - t0, lm.device, lm.dtype)
        from ..monitoring.metrics import install_worker_metrics; install_worker_metrics(worker)  # noqa: E702  (monitoring)

    def teardown(self, worker) -> None:
        if self.decode is not None:
            self.decode.close()

    def status(self) -> dict:
        """Load and counters the driver uses for routing and the report."""
        out = {"roles": sorted(self.roles)}
        if self.prefill is not None:
            out["prefill_tokens"] = self.prefill.tokens_done
            out["prefill_busy_s"] = self.prefill.busy_s
        if self.decode is not None:
            out.update(self.decode.load())
            out["decode_steps"] = self.decode.stats.steps
            out["decode_tokens"] = self.decode.stats.tokens
            out["decode_busy_s"] = self.decode.stats.busy_s
            out["kv_packets"] = self.decode.stats.kv_packets
            out["kv_packets_host_staged"] = self.decode.stats.kv_packets_host_staged
        return out


def host() -> EngineHost:
    """The engine host of the worker running the current task."""
    w = get_worker()
    plugin = w.plugins.get(PLUGIN_NAME)
    if plugin is None:
        raise RuntimeError(f"worker {w.name} has no pdbatch engines (plugin not registered)")
    return plugin


def worker_status(dask_worker=None) -> dict:
    """For `client.run`: the status of this worker's engines (empty when not set up yet)."""
    plugin = (dask_worker or get_worker()).plugins.get(PLUGIN_NAME)
    return plugin.status() if plugin is not None else {}


def sent_transfer_bytes(dask_worker=None) -> int:
    """For `client.run`: bytes other workers have fetched from this one since it started
    (Dask's running total; its transfer logs keep only the latest entries)."""
    return int((dask_worker or get_worker()).transfer_outgoing_bytes_total)


def worker_memory(dask_worker=None) -> dict:
    """For `client.run`: this worker process's peak RSS (the kernel's high-water mark, so no
    spike between samples is missed) and, on a decode worker, the KV pool's peak vs its budget."""
    import os
    import resource
    import sys

    w = dask_worker or get_worker()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    out = {"name": str(w.name), "pid": os.getpid(),
           "peak_rss_bytes": int(peak if sys.platform == "darwin" else peak * 1024)}
    plugin = w.plugins.get(PLUGIN_NAME)
    if plugin is not None and plugin.decode is not None:
        out["kv_pool_peak_bytes"] = plugin.decode.cache.peak_bytes
        out["kv_budget_bytes"] = plugin.decode.cache.budget_bytes
    return out
