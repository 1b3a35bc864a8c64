"""Driver-side progress: what the job has done so far, shown on the terminal (pdbatch.monitoring.terminal)
and sent to the scheduler (where the dashboard page and `/metrics` read it).

`JobProgress` is the pipeline's `on_progress` callback (called every loop iteration). It
takes a snapshot of the driver's own totals (the same figures the final report is built from),
hands it to the terminal display, and publishes it to the scheduler's pdbatch monitor when
something changed or a second has passed, together with the TTFT/TPOT samples not yet sent.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time

from .terminal import make_display

log = logging.getLogger("pdbatch")


def snapshot(pipeline) -> dict:
    """The driver's view of the job, as plain data (msgpack-friendly)."""
    now = time.time()
    t, r = pipeline.totals, pipeline.this_run
    expected = pipeline.plan.total_rows
    elapsed = max(now - pipeline.started, 1e-9)
    left = max(expected - t.rows, 0)
    eta = 0.0 if not left else (left / (r.rows / elapsed) if r.rows else None)
    return {
        "job": pipeline.token, "mode": pipeline.cfg.mode, "started": pipeline.started, "time": now,
        "rows": t.rows, "rows_expected": expected, "units_done": t.units,
        "units_total": len(pipeline.plan.units), "units_inflight": len(pipeline.inflight),
        # this invocation's work (resumed units excluded): the cluster's counters
        "rows_this_run": r.rows, "rows_failed": r.errors, "prompt_tokens": r.prompt_tokens,
        "output_tokens": r.output_tokens, "kv_bytes": r.kv_bytes,
        "output_tokens_per_s": r.output_tokens / elapsed, "eta_s": eta,
        "unit_rows": pipeline.cfg.unit_rows,
        # the driver's roles (driver/roles.py): worker name -> role, and the latest switches
        **(pipeline.roles.snapshot() if pipeline.cfg.mode == "disaggregated" else {}),
    }


class JobProgress:
    """The pipeline's on_progress callback: terminal display + scheduler publishing.

    The pipeline calls it on every loop iteration (hundreds of times a second when futures
    finish quickly), so it does nothing unless a unit finished or `tick_s` has passed."""

    def __init__(self, kind: str, echo, client=None, publish_every_s: float = 1.0, tick_s: float = 0.1):
        self.display = make_display(kind, echo)
        self.publisher = Publisher(client, publish_every_s) if client is not None else None
        self.tick_s = tick_s
        self.pipeline = None
        self.units, self.last = -1, 0.0

    def __call__(self, pipeline) -> None:
        self.pipeline = pipeline
        now = time.monotonic()
        if pipeline.totals.units == self.units and now - self.last < self.tick_s:
            return
        self.units, self.last = pipeline.totals.units, now
        snap = snapshot(pipeline)
        self.display.show(snap)
        if self.publisher is not None:
            self.publisher.publish(snap, pipeline.this_run)

    def close(self) -> None:
        """End of the job (or its failure): the final figures reach the scheduler for sure."""
        if self.publisher is not None and self.pipeline is not None:
            self.publisher.publish(snapshot(self.pipeline), self.pipeline.this_run, final=True)
        self.display.close()


class Publisher:
    """Sends snapshots to the scheduler's pdbatch monitor (its `pdbatch_progress` handler),
    installing the monitor first on a scheduler that was started without the preload.

    Sending never blocks the driver: the message goes out on the client's event loop, at most
    one at a time, when a unit finished (at most 4 times a second) or every `every_s` seconds.
    Only the final one is waited for."""

    def __init__(self, client, every_s: float = 1.0, min_gap_s: float = 0.25):
        self.client, self.every_s, self.min_gap_s = client, every_s, min_gap_s
        self.last_sent = 0.0
        self.last_units = -1
        self.sent = {"ttft": 0, "tpot": 0}  # samples of this_run already handed over
        self.pending = None  # concurrent.futures.Future of the message on its way
        self.enabled = self._attach()

    def _attach(self) -> bool:
        from .monitor import Monitor

        try:
            self.client.register_plugin(Monitor())  # idempotent: kept if there
            return True
        except Exception as e:  # e.g. the scheduler's environment has no pdbatch
            self._disable(e)
            return False

    def publish(self, snap: dict, this_run, final: bool = False) -> None:
        if not self.enabled or not (final or self._due(snap)):
            return
        if self.pending is not None and not self._settled(timeout=10 if final else 0):
            return
        # report.Reservoir: bounded, so `since` hands over what arrived after the samples already sent
        samples = {name: getattr(this_run, name).since(self.sent[name]) for name in self.sent}
        for name in samples:
            self.sent[name] = getattr(this_run, name).seen
        self.last_sent, self.last_units = time.monotonic(), snap["units_done"]
        self.pending = asyncio.run_coroutine_threadsafe(self._send(snap, samples), self.client.loop.asyncio_loop)
        if final:
            self._settled(timeout=10)

    def _due(self, snap: dict) -> bool:
        since = time.monotonic() - self.last_sent
        return since >= self.every_s or (snap["units_done"] != self.last_units and since >= self.min_gap_s)

    async def _send(self, snap: dict, samples: dict) -> None:
        await self.client.scheduler.pdbatch_progress(snapshot=snap, samples=samples)

    def _settled(self, timeout: float) -> bool:
        """Is the previous message done (waiting up to `timeout`)? Stops publishing if it failed."""
        try:
            self.pending.result(timeout=timeout)
        except concurrent.futures.TimeoutError:
            return False
        except Exception as e:  # monitoring must never fail the job
            self._disable(e)
            return False
        self.pending = None
        return True

    def _disable(self, e: Exception) -> None:
        self.enabled = False
        log.warning("pdbatch: no progress on the dashboard (%s: %s); start the scheduler with "
                    "--preload pdbatch.dashboard", type(e).__name__, e)
