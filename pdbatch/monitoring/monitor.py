"""The scheduler side of monitoring: one object that knows how the job is doing.

Two feeds meet here:
- each worker's `pdbatch` metrics, sent with its heartbeats (pdbatch.monitoring.metrics), read from
  `scheduler.workers[addr].metrics`;
- the driver's progress snapshots and new TTFT/TPOT samples (pdbatch.monitoring.progress), sent to the
  `pdbatch_progress` handler this plugin adds to the scheduler.

Once a second the monitor samples both into a time series (rates over a few seconds, busy
shares, queue depths, KV in flight) that the dashboard page (pdbatch.monitoring.dashboard) plots; the
Prometheus collector (pdbatch.monitoring.prometheus) reads the same state at scrape time. Counters add up
over every job run on this scheduler, so a long-lived (Slurm) scheduler's counters never go
back; the `job` snapshot is the current job only.

Installed by the scheduler preload (`dask_setup` below, loaded as `--preload pdbatch.dashboard`,
which the embedded cluster uses) or, on a scheduler started without it, by the driver
(`client.register_plugin`, pdbatch.monitoring.progress), so the page appears at job start.

    dask scheduler --preload pdbatch.dashboard --scheduler-file sched.json   # Slurm, by hand
    Scheduler(..., preload=["pdbatch.dashboard"])                            # in Python
"""

from __future__ import annotations

import time
from collections import deque

from distributed.diagnostics.plugin import SchedulerPlugin
from tornado.ioloop import PeriodicCallback

from .histogram import Histogram
from .metrics import METRIC_NAME, ROLES

MONITOR_NAME = "pdbatch-monitor"
DECODE_POOL_METRICS = {"kv_budget_bytes": "decode", "kv_used_bytes": "decode"}  # the decode engine's, by name
HANDLER = "pdbatch_progress"
# driver totals of one invocation that become cluster-lifetime counters
COUNTERS = ("rows_this_run", "rows_failed", "prompt_tokens", "output_tokens", "kv_bytes")


class Monitor(SchedulerPlugin):
    name = MONITOR_NAME
    idempotent = True

    def __init__(self, sample_every_s: float = 1.0, history: int = 3600, rate_window_s: float = 5.0):
        self.sample_every_s, self.history, self.rate_window_s = sample_every_s, history, rate_window_s
        self.scheduler = None
        self.job: dict = {}  # the driver's latest snapshot (pdbatch.monitoring.progress.snapshot)
        self.jobs_seen = 0
        self._finished = dict.fromkeys(COUNTERS, 0)  # totals of earlier jobs
        self.ttft, self.tpot = Histogram(), Histogram()
        self.series: deque[dict] = deque(maxlen=history)
        self._sampler = None

    # --- lifecycle -------------------------------------------------------------------------
    async def start(self, scheduler) -> None:
        from .dashboard import add_page
        from .prometheus import register_collector

        self.scheduler = scheduler
        scheduler.handlers[HANDLER] = self.receive
        self._sampler = PeriodicCallback(self.sample, self.sample_every_s * 1000)
        self._sampler.start()
        register_collector(self)
        add_page(scheduler, self)

    async def close(self) -> None:
        from .prometheus import unregister_collector

        if self._sampler is not None:
            self._sampler.stop()
        unregister_collector(self)

    # --- driver feed -----------------------------------------------------------------------
    def receive(self, snapshot: dict, samples: dict | None = None) -> None:
        """A driver snapshot and the TTFT/TPOT samples new since its previous message."""
        if snapshot.get("job") != self.job.get("job"):
            for k in COUNTERS:
                self._finished[k] += self.job.get(k, 0)
            self.jobs_seen += 1
            self.job = snapshot
        elif snapshot.get("time", 0) >= self.job.get("time", 0):  # messages may overtake each other
            self.job = snapshot
        samples = samples or {}
        self.ttft.observe(samples.get("ttft", ()))
        self.tpot.observe(samples.get("tpot", ()))

    def counter(self, name: str) -> int:
        """Cluster-lifetime total of a driver counter (see COUNTERS)."""
        return self._finished[name] + self.job.get(name, 0)

    # --- worker feed -----------------------------------------------------------------------
    def roles(self) -> dict[str, dict]:
        """Per role: worker count and the sum of each numeric worker metric; `decode_step_s`
        is the list of recent decode step times of all decode workers.

        A worker's role is the driver's (the job snapshot's `roles`, driver/roles.py: with
        rebalancing, every engine does both phases and the driver moves workers between them),
        else its engine's. Metrics named prefill_* / decode_* count towards that phase whatever
        the worker's role now (a worker that just switched still finishes its rows); the others
        (KV held, incoming) towards the worker's role; the decode KV pool's towards decode."""
        out = {r: {"workers": 0, "decode_step_s": []} for r in ROLES}
        driver_roles = self.job.get("roles") or {}
        for ws in list(self.scheduler.workers.values()) if self.scheduler else ():
            m = (ws.metrics or {}).get(METRIC_NAME) or {}
            roles = m.get("roles") or [r for r in ROLES if (ws.resources or {}).get(r, 0) > 0]
            if str(ws.name) in driver_roles:
                roles = [driver_roles[str(ws.name)]]
            for role in roles:
                out.setdefault(role, {"workers": 0, "decode_step_s": []})["workers"] += 1
            for k, v in m.items():
                if not isinstance(v, (int, float)):
                    continue
                phase = DECODE_POOL_METRICS.get(k) or k.split("_", 1)[0]
                for role in [phase] if phase in ROLES else roles:
                    agg = out.setdefault(role, {"workers": 0, "decode_step_s": []})
                    agg[k] = agg.get(k, 0) + v
            out["decode"]["decode_step_s"] += m.get("decode_step_s") or []
        return out

    # --- time series -----------------------------------------------------------------------
    def sample(self) -> dict:
        now = time.time()
        roles = self.roles()
        p, d = roles["prefill"], roles["decode"]
        point = {
            "time": now,
            # cumulative values (rates come from their differences)
            "prefill_tokens": p.get("prefill_tokens", 0), "decode_tokens": d.get("decode_tokens", 0),
            "prefill_busy_s": p.get("prefill_busy_s", 0.0), "decode_busy_s": d.get("decode_busy_s", 0.0),
            "output_tokens": self.counter("output_tokens"), "kv_bytes": self.counter("kv_bytes"),
            "rows": self.job.get("rows", 0),
            # gauges
            "prefill_workers": p["workers"], "decode_workers": d["workers"],
            "role_switches": self.job.get("role_switches", 0),
            "prefill_queue": p.get("prefill_queue", 0), "decode_queue": d.get("decode_queue", 0),
            "decode_active": d.get("decode_active", 0), "decode_waiting": d.get("decode_waiting", 0),
            "kv_held_prefill": p.get("kv_held_bytes", 0), "kv_held_decode": d.get("kv_held_bytes", 0),
            "kv_incoming": d.get("kv_incoming_bytes", 0),
            "ttft_p50": self.ttft.recent_quantile(50), "ttft_p99": self.ttft.recent_quantile(99),
            "tpot_p50": self.tpot.recent_quantile(50), "tpot_p99": self.tpot.recent_quantile(99),
        }
        point.update(self._rates(point))
        self.series.append(point)
        return point

    def _rates(self, point: dict) -> dict:
        old = None
        for prev in reversed(self.series):
            old = prev
            if point["time"] - prev["time"] >= self.rate_window_s:
                break
        dt = point["time"] - old["time"] if old else 0.0

        def rate(key):
            return max(point[key] - old[key], 0) / dt if dt > 0 else 0.0

        def share(key, workers):
            return min(rate(key) / workers, 1.0) if workers else 0.0

        return {
            "prefill_tokens_per_s": rate("prefill_tokens"), "decode_tokens_per_s": rate("decode_tokens"),
            "output_tokens_per_s": rate("output_tokens"), "kv_bytes_per_s": rate("kv_bytes"),
            "rows_per_s": rate("rows"),
            "prefill_busy": share("prefill_busy_s", point["prefill_workers"]),
            "decode_busy": share("decode_busy_s", point["decode_workers"]),
        }

    def latest(self) -> dict:
        return self.series[-1] if self.series else self.sample()


def dask_setup(scheduler) -> None:
    """Preload entry point: Dask starts the plugin (and so the page) right after this."""
    scheduler.add_plugin(Monitor(), idempotent=True)


def find_monitor(scheduler) -> Monitor | None:
    return scheduler.plugins.get(MONITOR_NAME)
