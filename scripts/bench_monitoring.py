#!/usr/bin/env python
"""Does monitoring slow the job? Job throughput with the dashboard and metrics off and on.

    python scripts/bench_monitoring.py [--rows 256] [--max-new-tokens 32] [--repeats 3] [--browser] [--on-first]

Configurations, run in rotation (off, on, on+viewer, off, ...) so that load from other
processes on the machine spreads over all of them; each run is a fresh local cluster (scheduler
in this process, one prefill and one decode worker process) and a fresh output directory:
- off:        no dashboard, no pdbatch monitor, worker heartbeat metrics removed, no publishing;
- on:         what `pdbatch run` does (dashboard, monitor preload, worker metrics, publishing);
- on+viewer:  `on` with the pdbatch page open in headless Chromium and /metrics scraped every
              second (with --browser).
Prints one JSON line per run (with the cost of each monitoring step, measured where it runs)
and a summary: median output tokens/s, and median CPU time (driver + scheduler process and the
workers) per output token, which the load of other processes on a shared machine disturbs less.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import threading
import time
import urllib.request

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)


def make_input(path: str, rows: int) -> None:
    base = pq.read_table(os.path.join(REPO, "data", "sample.parquet")).column("prompt").to_pylist()
    pq.write_table(pa.table({"prompt": [base[i % len(base)] for i in range(rows)]}), path)


def run_once(config: str, inp: str, out: str, args) -> dict:
    from distributed import Client, Scheduler, SpecCluster

    from pdbatch.config import JobConfig
    from pdbatch.driver.cluster import quiet_dask_logs, worker_specs
    from pdbatch.driver.pipeline import Pipeline
    from pdbatch.io.dataset import plan_input
    from pdbatch.io.output import OutputDir
    from pdbatch.monitoring.progress import JobProgress

    quiet_dask_logs()
    on = config != "off"
    cfg = JobConfig(input=inp, output=out, max_new_tokens=args.max_new_tokens, unit_rows=args.unit_rows,
                    ignore_eos=True, threads_per_worker=1, progress="none")
    options = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "dashboard": on}
    if on:
        options["preload"] = ["pdbatch.dashboard"]
    with SpecCluster(workers=worker_specs(cfg, "tcp", 1), scheduler={"cls": Scheduler, "options": options},
                     silence_logs=logging.WARNING) as cluster, Client(cluster) as client:
        cfg.scheduler_address = cluster.scheduler_address
        plan = plan_input(inp, prompt_column="prompt", id_column=None, keep_columns=[], unit_rows=cfg.unit_rows)
        output = OutputDir(out)
        done = output.prepare({"input": plan.fingerprint(), **cfg.result_options()}, False)
        progress = Timed(JobProgress("none", print, client if on else None))
        pipeline = Pipeline(cfg, client, plan, output, done, on_progress=progress)
        pipeline.register_engines()
        if not on:
            client.run(_drop_worker_metrics)
        viewer = Viewer(cluster.dashboard_link) if config == "on+viewer" else None
        procs = [psutil.Process()] + [psutil.Process(pid) for pid in client.run(os.getpid).values()]
        cpu0 = sum(cpu_seconds(p) for p in procs)
        try:
            pipeline.started = time.time()  # engine loading is not the job's throughput
            report = pipeline.run()
            progress.close()
        finally:
            if viewer:
                viewer.stop()
        cpu = sum(cpu_seconds(p) for p in procs) - cpu0
        costs = measure_costs(client) if on else {}
    return {"config": config, "output_tokens_per_s": report["output_tokens_per_s"], "wall_s": report["wall_s"],
            "rows": report["rows"], "output_tokens": report["output_tokens"],
            "cpu_ms_per_output_token": round(cpu / report["output_tokens"] * 1000, 3),
            "driver_progress_ms": round(progress.seconds * 1000, 1), "driver_progress_calls": progress.calls,
            **costs}


def cpu_seconds(p) -> float:
    """User + system CPU time of a process (the driver's also holds the scheduler)."""
    t = p.cpu_times()
    return t.user + t.system


class Timed:
    """Wraps the on_progress callback: how much driver time does progress reporting take?"""

    def __init__(self, f):
        self.f, self.calls, self.seconds = f, 0, 0.0

    def __call__(self, pipeline) -> None:
        t0 = time.perf_counter()
        self.f(pipeline)
        self.seconds += time.perf_counter() - t0
        self.calls += 1

    def close(self) -> None:
        t0 = time.perf_counter()
        self.f.close()
        self.seconds += time.perf_counter() - t0


def measure_costs(client, n: int = 200) -> dict:
    """Microseconds per call of each periodic monitoring step, measured where it runs."""
    def on_worker(dask_worker=None):
        from pdbatch.monitoring.metrics import METRIC_NAME

        metric = dask_worker.metrics[METRIC_NAME]  # as installed, bound to the worker's engine
        t0 = time.perf_counter()
        for _ in range(n):
            metric(dask_worker)
        return (time.perf_counter() - t0) / n * 1e6

    def on_scheduler(dask_scheduler=None):
        from prometheus_client import generate_latest

        from pdbatch.monitoring.monitor import find_monitor
        from pdbatch.monitoring.prometheus import collect_monitor

        mon = find_monitor(dask_scheduler)
        out = {}
        for name, f in (("sample", mon.sample), ("collect", lambda: list(collect_monitor(mon))),
                        ("metrics_page", generate_latest)):
            t0 = time.perf_counter()
            for _ in range(n // 10):
                f()
            out[name] = (time.perf_counter() - t0) / (n // 10) * 1e6
        return out

    per_worker = client.run(on_worker)
    sched = client.run_on_scheduler(on_scheduler)
    return {"worker_metrics_us": round(max(per_worker.values()), 1),
            "scheduler_sample_us": round(sched["sample"], 1),
            "scheduler_collect_us": round(sched["collect"], 1),
            "whole_metrics_page_us": round(sched["metrics_page"], 1)}


def _drop_worker_metrics(dask_worker=None):
    # a new dict, never a change in place: a heartbeat may be iterating over the old one
    dask_worker.metrics = {k: v for k, v in dask_worker.metrics.items() if k != "pdbatch"}


class Viewer:
    """The pdbatch page open in headless Chromium and /metrics scraped once a second."""

    def __init__(self, dashboard_link: str):
        self.base = dashboard_link.rsplit("/", 1)[0]
        self.stopping = threading.Event()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.ready.wait(120)

    def _run(self) -> None:
        from playwright.sync_api import sync_playwright

        args = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--disable-quic"]
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=args, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1500})
            page.goto(self.base + "/pdbatch")
            page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=120_000)
            self.ready.set()
            while not self.stopping.is_set():
                urllib.request.urlopen(self.base + "/metrics", timeout=30).read()
                page.wait_for_timeout(1000)
            browser.close()

    def stop(self) -> None:
        self.stopping.set()
        self.thread.join(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=256)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--unit-rows", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--browser", action="store_true", help="also measure with the page open in Chromium")
    ap.add_argument("--on-first", action="store_true", help="rotate on, off (default off, on)")
    args = ap.parse_args()
    configs = (["on", "off"] if args.on_first else ["off", "on"]) + (["on+viewer"] if args.browser else [])
    results: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        inp = os.path.join(tmp, "in.parquet")
        make_input(inp, args.rows)
        for rep in range(args.repeats):
            for config in configs:
                r = run_once(config, inp, os.path.join(tmp, f"out-{config}-{rep}"), args)
                print(json.dumps(r), flush=True)
                results[config].append(r["output_tokens_per_s"])
                cpu[config].append(r["cpu_ms_per_output_token"])
    base, cpu_base = statistics.median(results["off"]), statistics.median(cpu["off"])
    for config, values in results.items():
        med, cpu_med = statistics.median(values), statistics.median(cpu[config])
        print(f"{config:10s} median {med:7.1f} output tokens/s ({(med / base - 1) * 100:+.1f}% vs off), "
              f"runs {', '.join(f'{v:.1f}' for v in values)}; CPU {cpu_med:.3f} ms per output token "
              f"({(cpu_med / cpu_base - 1) * 100:+.1f}% vs off)")


if __name__ == "__main__":
    main()
