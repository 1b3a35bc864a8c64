"""A decode task's packets go to the worker's decode engine as soon as the task is ready, not when
a Dask thread is free to run it.

A worker with both roles (rebalancing) may be prefilling in its only Dask thread when the driver
calls it back to decode: its decode task is then ready (its KV is in the worker's memory) but
waits for that prefill to end, seconds in which the unit's rows, first token out, count towards
their TPOT. The decode itself needs no Dask thread (the engine decodes in its own), so the
worker plugin (worker.EngineHost) hands the packets to the engine when the task turns ready, from
Dask's own state machine, and the task, when it runs, takes the engine's futures from here
instead of submitting again. Dask's task states are untouched: no secede for a computing task
(dask/distributed#6709), no extra thread.
"""

from __future__ import annotations

import logging
import threading

from ..kv.packet import KVPacket

log = logging.getLogger("pdbatch.worker")

DECODE_PREFIX = "decode-"  # the driver's decode task keys (pipeline.Pipeline._key)


def transfer_seconds(worker, dep_key: str) -> float:
    """Seconds `worker` spent fetching `dep_key` from another worker (0 if it was local)."""
    return sum(e["duration"] for e in worker.transfer_incoming_log if dep_key in e.get("keys", {}))


def submit_unit(engine, prefilled, transfer_s: float) -> list:
    """The unit's packets handed to `engine`: one engine future per packet, finished rows as they are."""
    return [engine.submit_packet(p, transfer_s) if isinstance(p, KVPacket) else p for p in prefilled]


class EarlyDecode:
    """Engine futures of decode tasks started before they ran, by task key."""

    def __init__(self):
        self._started: dict[str, list] = {}
        self._lock = threading.Lock()

    def on_transition(self, worker, engine, key, finish: str) -> None:
        """WorkerPlugin.transition (Dask's event loop; must be quick and never raise)."""
        if not (isinstance(key, str) and key.startswith(DECODE_PREFIX)):
            return
        if finish != "ready":
            if finish in ("released", "forgotten", "error"):  # never ran, or done: drop the futures
                with self._lock:
                    self._started.pop(key, None)
            return
        if engine is None:
            return
        ts = worker.state.tasks.get(key)
        deps = list(ts.dependencies) if ts is not None else []
        if len(deps) != 1 or deps[0].key not in worker.data:
            return
        dep = deps[0].key
        try:
            futs = submit_unit(engine, worker.data[dep], transfer_seconds(worker, dep))
        except Exception:  # the task itself submits, and fails with the real error
            log.debug("early decode of %s not started", key, exc_info=True)
            return
        with self._lock:
            self._started[key] = futs

    def take(self, key) -> list | None:
        """The task's futures if its decode already started (then only once), else None."""
        with self._lock:
            return self._started.pop(key, None)
