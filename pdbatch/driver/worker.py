"""What lives inside each Dask worker: one engine (pdbatch.engines) for the worker's roles, its
model loaded once.

A worker's role comes from the resources it was started with (`prefill=1`, `decode=1`), fixed
at start (changing resources on a live worker corrupts the scheduler's counts, dask#6677). With
rebalancing on, roles are the driver's (driver/roles.py) and every engine does both phases. The
plugin is registered once by the driver and Dask runs its setup on every worker, including
workers that join mid-job, so scaling a role needs no restart.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import TYPE_CHECKING

from distributed import WorkerPlugin, get_worker

from .early_decode import EarlyDecode

if TYPE_CHECKING:
    from ..engines import Engine

PLUGIN_NAME = "pdbatch-engines"
log = logging.getLogger("pdbatch.worker")


class _DropHeartbeatAfterClose(logging.Filter):
    """Dask's heartbeat can race the worker's own close: a heartbeat in flight finds the
    worker's connection pool closed, Dask logs "Unexpected exception during heartbeat" and
    re-raises, and tornado's periodic callback logs "Exception in callback <...Worker.heartbeat...>",
    each with a RuntimeError traceback, on the user's terminal after the job's last line. The
    worker was closing anyway and nothing is lost: drop exactly those two records."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not (isinstance(exc, RuntimeError) and str(exc) == "ConnectionPool is closed"):
            return True
        msg = record.getMessage()
        return not (msg.startswith("Unexpected exception during heartbeat")
                    or (msg.startswith("Exception in callback") and "Worker.heartbeat" in msg))


def quiet_worker_logs() -> None:
    """In a worker process (EngineHost.setup): the heartbeat-after-close records go."""
    for name in ("distributed.worker", "tornado.application"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropHeartbeatAfterClose) for f in logger.filters):
            logger.addFilter(_DropHeartbeatAfterClose())


# glibc's malloc thresholds in a worker process. Dask's Nanny starts workers with
# MALLOC_TRIM_THRESHOLD_=65536 (distributed.nanny.pre-spawn-environ), so that freed memory goes
# back to the OS; setting it also switches off glibc's dynamic mmap threshold, and every buffer
# over 128 KiB an engine step allocates (logits, attention scratch) becomes a fresh mmap, faulted
# in and unmapped again. Measured, vLLM's CPU engine alone on 100 rows (bench-30m, 1 thread):
# 46.7 s with Dask's setting, 35.0 s without, 34.0 s with these values (the built-in engine:
# 54.0 against 51.5 s). They are what glibc's dynamic rule grows to on 64-bit, fixed.
MMAP_THRESHOLD = 32 << 20
TRIM_THRESHOLD = 64 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (glibc's malloc.h)


def restore_malloc_thresholds() -> bool:
    """In a worker process (EngineHost.setup): glibc's thresholds back where its dynamic rule
    would put them, if a trim threshold below them was set in the environment (Dask's) and no
    mmap threshold was. Returns whether they were changed (False off glibc)."""
    try:
        trim = int(os.environ.get("MALLOC_TRIM_THRESHOLD_", TRIM_THRESHOLD))
    except ValueError:
        return False
    if trim >= TRIM_THRESHOLD or "MALLOC_MMAP_THRESHOLD_" in os.environ:
        return False
    try:
        mallopt = ctypes.CDLL("libc.so.6").mallopt
    except (OSError, AttributeError):  # not glibc
        return False
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD))


def worker_roles(resources: dict) -> set[str]:
    return {r for r in ("prefill", "decode") if resources.get(r, 0) > 0}


class EngineHost(WorkerPlugin):
    """Holds this worker's one engine (pdbatch.engines), built for the worker's roles."""

    name = PLUGIN_NAME

    def __init__(self, *, model: str, dtype: str, device: str, mode: str, max_batch_tokens: int,
                 kv_budget_bytes: int, max_num_seqs: int, max_model_len: int, threads: int,
                 engine: str = "builtin", rebalance: bool = False, enforce_eager: bool = True):
        self.options = dict(model=model, dtype=dtype, device=device, mode=mode,
                            max_batch_tokens=max_batch_tokens, kv_budget_bytes=kv_budget_bytes,
                            max_num_seqs=max_num_seqs, max_model_len=max_model_len, threads=threads,
                            engine=engine, rebalance=rebalance, enforce_eager=enforce_eager)
        self.engine: Engine | None = None
        self.worker = None  # set in setup, with what cannot be pickled (the plugin travels pickled)
        self.early_decode: EarlyDecode | None = None

    async def setup(self, worker) -> None:
        import asyncio

        from ..engines import create_engine
        from ..monitoring.metrics import install_worker_metrics

        quiet_worker_logs()
        restore_malloc_thresholds()
        self.worker, self.early_decode = worker, EarlyDecode()
        o = self.options
        t0 = time.time()
        name = str(worker.name)
        # colocated, or disaggregated with rebalancing (the driver moves workers between the
        # roles, driver/roles.py): both phases; otherwise what the worker's resources say
        both = o["mode"] == "colocated" or o.get("rebalance")
        roles = {"prefill", "decode"} if both else worker_roles(worker.state.total_resources)
        # built in a thread: loading a model (and vLLM's start-up, seconds) must not stall the
        # worker's event loop (heartbeats, the dashboard, transfers to other workers)
        self.engine = await asyncio.get_running_loop().run_in_executor(
            None, create_engine, o["engine"], o, roles, name)
        log.info("pdbatch worker %s ready as %s in %.1fs (%s)", name, "+".join(sorted(roles)),
                 time.time() - t0, self.engine)
        install_worker_metrics(worker, self.engine)

    def transition(self, key, start, finish, **kwargs) -> None:
        if self.early_decode is not None:  # a decode task turned ready: its decode starts (early_decode.py)
            self.early_decode.on_transition(self.worker, self.engine, key, finish)

    def teardown(self, worker) -> None:
        if self.engine is not None:
            self.engine.close()

    def status(self) -> dict:
        """Load and counters the driver uses for routing and the report."""
        e = self.engine
        if e is None:
            return {"roles": []}
        s = e.stats()
        out = {"roles": sorted(e.roles), "prefills_beside_decode": e.prefills_beside_decode}
        if "prefill" in e.roles:
            out["prefill_tokens"] = s.prefill_tokens
            out["prefill_busy_s"] = s.prefill_busy_s
        if "decode" in e.roles:
            out.update(e.load())
            out["decode_steps"] = s.decode_steps
            out["decode_tokens"] = s.decode_tokens
            out["decode_busy_s"] = s.decode_busy_s
            out["kv_packets"] = s.kv_packets
            out["kv_packets_host_staged"] = s.kv_packets_host_staged
        return out


def current_host() -> EngineHost:
    """The engine host of the worker running the current task, its engine built."""
    w = get_worker()
    plugin = w.plugins.get(PLUGIN_NAME)
    if plugin is None or plugin.engine is None:
        raise RuntimeError(f"worker {w.name} has no pdbatch engine (plugin not registered)")
    return plugin


def current_engine() -> Engine:
    """The engine of the worker running the current task."""
    return current_host().engine


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
    engine = getattr(w.plugins.get(PLUGIN_NAME), "engine", None)
    if engine is not None and "decode" in engine.roles:
        s = engine.stats()
        out["kv_pool_peak_bytes"] = s.kv_pool_peak_bytes
        out["kv_budget_bytes"] = s.kv_budget_bytes
    return out
