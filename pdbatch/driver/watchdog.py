"""The driver's watchdog: a job whose units stop making progress is diagnosed and acted on, never
left waiting.

Progress is anything that shows work moving: a unit changing phase or finishing (the pipeline
calls `progress()`), or the engines' token counters growing (polled from the workers once the
job has been quiet for POLL_AFTER_S). When neither has happened for `bound()` seconds while
units are in flight, `check` asks the scheduler what each stuck unit's tasks are doing (state,
worker, exception) and reads the recent errors in those workers' logs; the pipeline then
retries the unit with that diagnosis as the failed attempt's reason (bounded retries, then
quarantine, as for any failed task).

The bound: `--stall-timeout` when given; otherwise max(MIN_BOUND_S, FACTOR x the longest quiet
gap seen so far in this job). A slow model (minutes per prefill pass) stretches its own bound as
it goes; a healthy small model keeps the 180 s floor, so a hung job ends within ~3 minutes.
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("pdbatch")

MIN_BOUND_S = 180.0
FACTOR = 10.0
POLL_AFTER_S = 5.0  # quiet this long: start asking workers whether tokens still move
POLL_EVERY_S = 5.0
LOG_LINES = 200  # of each suspect worker's log, searched for errors


class Watchdog:
    def __init__(self, client, fixed_bound_s: float | None = None):
        self.client = client
        self.fixed = fixed_bound_s
        self.last = time.time()
        self.longest_gap = 0.0
        self._tokens: dict[str, int] = {}
        self._polled = 0.0

    def bound(self) -> float:
        return self.fixed if self.fixed else max(MIN_BOUND_S, FACTOR * self.longest_gap)

    def progress(self) -> None:
        now = time.time()
        self.longest_gap = max(self.longest_gap, now - self.last)
        self.last = now

    def _engines_moved(self) -> bool:
        from .worker import worker_status

        got = self.client.run(worker_status, on_error="return")
        moved = False
        for addr, s in got.items():
            if not isinstance(s, dict):
                continue
            total = int(s.get("prefill_tokens", 0)) + int(s.get("decode_tokens", 0))
            prev = self._tokens.get(addr)
            moved = moved or (prev is not None and total > prev)
            self._tokens[addr] = total
        return moved

    def check(self, inflight: dict) -> list[tuple[object, str]]:
        """Units to retry, each with the reason; empty while the job moves or is idle."""
        now = time.time()
        if not inflight:
            self.last = now
            return []
        quiet = now - self.last
        if quiet < POLL_AFTER_S:
            return []
        if now - self._polled >= POLL_EVERY_S:
            self._polled = now
            try:
                if self._engines_moved():
                    self.progress()
                    return []
            except Exception:  # a worker going away mid-call: the pipeline's recovery handles it
                pass
        if quiet < self.bound():
            return []
        stuck = [u for u in inflight.values() if u.futures]
        if not stuck:
            return []
        keys = [f.key for u in stuck for f in u.futures.values() if not f.done()]
        states = self._task_states(keys)
        errors = self._worker_errors({s["worker"] for s in states.values() if s.get("worker")}
                                     | {w for u in stuck for w in (u.prefill_worker, u.decode_worker) if w})
        out = []
        for u in stuck:
            mine = [f.key for f in u.futures.values() if not f.done() and f.key in states]
            parts = [f"{k}: {states[k]['state']}" + (f" on {states[k]['worker']}" if states[k].get("worker") else "")
                     + (f" ({states[k]['exception']})" if states[k].get("exception") else "") for k in mine]
            workers = {states[k].get("worker") for k in mine} | {u.prefill_worker, u.decode_worker}
            logs = [f"{w}: {errors[w]}" for w in sorted(filter(None, workers)) if w in errors]
            why = (f"no progress for {quiet:.0f}s (watchdog bound {self.bound():.0f}s): "
                   + ("; ".join(parts) or "no pending task") + ("; worker log: " + " | ".join(logs) if logs else ""))
            log.error("unit %s: %s", u.unit.unit_id, why)
            out.append((u, why))
        self.last = now  # the retried units start a fresh wait
        return out

    def _task_states(self, keys: list) -> dict:
        def states(dask_scheduler, keys):
            out = {}
            for k in keys:
                ts = dask_scheduler.tasks.get(k)
                if ts is None:
                    out[k] = {"state": "unknown to the scheduler"}
                    continue
                where = ts.processing_on or next(iter(ts.who_has or ()), None)
                waiting = [d.key for d in ts.dependencies if d.state != "memory"]
                out[k] = {"state": ts.state + (f", waiting for {waiting}" if waiting else ""),
                          "worker": where.address if where else None,
                          "exception": str(ts.exception_blame and ts.exception) if ts.exception else None}
            return out
        try:
            return self.client.run_on_scheduler(states, keys=keys)
        except Exception as e:
            return {k: {"state": f"scheduler did not answer ({type(e).__name__})"} for k in keys}

    def _worker_errors(self, workers: set) -> dict:
        """The last error line in each worker's recent log."""
        if not workers:
            return {}
        try:
            logs = self.client.get_worker_logs(n=LOG_LINES, workers=list(workers))
        except Exception:
            return {}
        out = {}
        for addr, lines in logs.items():
            bad = [msg for level, msg in lines if level in ("ERROR", "CRITICAL", "WARNING")
                   and ("rror" in msg or "xception" in msg or "ailed" in msg)]
            if bad:
                out[addr] = bad[-1].strip().splitlines()[-1][:300] if bad[-1].strip() else ""
        return out
