"""Monitoring: the pdbatch page on the Dask dashboard (in headless Chromium), the pdbatch_*
metrics on /metrics, and the terminal progress display.

The cluster tests run real jobs (`run_job`) on an existing cluster started here (scheduler in
this process, one prefill and one decode worker process), so the dashboard and /metrics can
still be read once the job is done, before the cluster closes.
"""

from __future__ import annotations

import io
import logging
import re
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest
from distributed import Scheduler, SpecCluster

from pdbatch.config import JobConfig
from pdbatch.driver.cluster import worker_specs
from pdbatch.driver.runner import run_job
from pdbatch.monitoring.histogram import Histogram
from pdbatch.monitoring.metrics import install_worker_metrics
from pdbatch.monitoring.monitor import Monitor
from pdbatch.monitoring.terminal import ProgressBar, ProgressLog, format_eta, make_display

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "data" / "sample.parquet")
ARTIFACTS = REPO / "test-artifacts"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-quic"]


def job_config(out: Path, **kw) -> JobConfig:
    values = dict(input=SAMPLE, output=str(out), max_new_tokens=16, ignore_eos=True, unit_rows=8,
                  threads_per_worker=1, progress="none")
    values.update(kw)
    return JobConfig(**values)


def start_cluster(preload: bool) -> SpecCluster:
    """Scheduler here with its dashboard on a free loopback port; workers tagged by role."""
    options = {"host": "127.0.0.1", "dashboard_address": "127.0.0.1:0", "dashboard": True}
    if preload:
        options["preload"] = ["pdbatch.dashboard"]
    return SpecCluster(workers=worker_specs(JobConfig(), "tcp", 1), scheduler={"cls": Scheduler, "options": options},
                       silence_logs=logging.WARNING, name="pdbatch-monitoring-test")


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.status == 200
        return r.read().decode()


def prometheus_values(text: str) -> dict[str, float]:
    """{'name{labels}': value} for the pdbatch_ samples of a /metrics page."""
    out = {}
    for line in text.splitlines():
        if line.startswith("pdbatch_"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


# --- the dashboard page in a real browser ---------------------------------------------------------
def test_dashboard_page_shows_a_live_job(tmp_path):
    pw = pytest.importorskip("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        pytest.skip("Debian's chromium is not installed (scripts/test.sh installs it)")
    ARTIFACTS.mkdir(exist_ok=True)
    lines: list[str] = []
    with start_cluster(preload=True) as cluster:
        # a fixed split, so every unit's KV crosses workers and the page's KV rate must rise
        # (with rebalancing a prefill worker may decode its own units and no KV moves)
        cfg = job_config(tmp_path / "out", scheduler_address=cluster.scheduler_address, max_new_tokens=64,
                         rebalance=False)
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        result: dict = {}

        def job():
            try:
                result["report"] = run_job(cfg, echo=lines.append)
            except BaseException as e:  # surfaced by the main thread
                result["error"] = e

        runner = threading.Thread(target=job, daemon=True)
        with pw.sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            try:
                page = browser.new_page(viewport={"width": 1400, "height": 1500})
                page.goto(f"{base}/pdbatch")  # opened before the job starts: it must update live
                page.wait_for_function("() => window.Bokeh && Bokeh.documents.length > 0", timeout=120_000)
                runner.start()
                # the websocket streams the job's progress into the open page
                deadline = time.time() + 300
                while not page.evaluate(LIVE_DECODE_JS) and time.time() < deadline:
                    assert "error" not in result, result["error"]
                    page.wait_for_timeout(500)
                runner.join(timeout=300)
                assert not runner.is_alive() and "error" not in result, result.get("error")
                report = result["report"]
                done = f"{report['rows']}/{report['rows_expected']} rows"
                page.wait_for_function(SUMMARY_HAS_JS, arg=done, timeout=60_000)
                page.wait_for_timeout(1500)
                data = page.evaluate(SOURCES_JS)
                canvases = page.locator("canvas").count()
                page.screenshot(path=str(ARTIFACTS / "monitoring-pdbatch-page.png"), full_page=True)
            finally:
                browser.close()
    assert report["rows"] == report["rows_expected"] == 64
    # the dashboard URL is printed once, at start: the pdbatch page of this cluster
    assert re.search(rf"dashboard {re.escape(base)}/pdbatch\b", lines[0]), lines[0]
    assert canvases >= 9, f"{canvases} canvases: not every plot rendered"
    series = data["pdbatch-series"]
    assert len(series["time"]) >= 3
    for column in ("prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "kv_bytes_per_s",
                   "decode_active", "ttft_p50", "tpot_p50"):
        assert max(v for v in series[column] if v == v) > 0, f"{column} never rose above 0"
    assert sum(data["pdbatch-ttft"]["count"]) == sum(data["pdbatch-tpot"]["count"]) == 64
    assert data["pdbatch-progress"]["done"] == [1]
    assert data["pdbatch-progress"]["label"][0].startswith("64/64 rows")
    assert data["pdbatch-roles"]["role"] == ["prefill", "decode"]
    # the driver's roles (a fixed split here): one worker each, all job long
    counts = [int(label.split(": ")[1].split(" ")[0]) for label in data["pdbatch-roles"]["label"]]
    assert counts == [1, 1] and series["prefill_workers"][-1] == series["decode_workers"][-1] == 1
    assert "pdbatch job" in data["summary"] and "64/64 rows" in data["summary"]
    # the roles view: every worker's current role and the split's mode (no switch when fixed)
    assert report["role_switches"] == []
    roles_now = data["roles_now"]
    assert "rebalancing off (fixed split), 0 switches, units of 8 rows" in roles_now
    assert all(w in roles_now for w in ("prefill-0", "decode-0"))


SUMMARY_HAS_JS = "(text) => Bokeh.documents[0].get_model_by_name('pdbatch-summary').text.includes(text)"
LIVE_DECODE_JS = """() => {
    const s = Bokeh.documents[0].get_model_by_name('pdbatch-series');
    const v = s && s.data['decode_tokens_per_s'];
    return v && Array.from(v).some(x => x > 0);
}"""
SOURCES_JS = """() => {
    const doc = Bokeh.documents[0];
    const out = {summary: doc.get_model_by_name('pdbatch-summary').text,
                 roles_now: doc.get_model_by_name('pdbatch-roles-now').text};
    for (const name of ['pdbatch-series', 'pdbatch-roles', 'pdbatch-progress', 'pdbatch-ttft', 'pdbatch-tpot']) {
        const data = doc.get_model_by_name(name).data;
        out[name] = Object.fromEntries(Object.entries(data).map(([k, v]) => [k, Array.from(v)]));
    }
    return out;
}"""


# --- /metrics ---------------------------------------------------------------------------------------
def test_metrics_equal_the_report_on_a_scheduler_without_the_preload(tmp_path):
    """A plain `dask scheduler`: the driver installs the monitor itself at job start."""
    with start_cluster(preload=False) as cluster:
        base = cluster.dashboard_link.rsplit("/", 1)[0]
        assert "pdbatch_" not in http_get(f"{base}/metrics")
        # fixed roles: per-role figures are then those of the workers started with each role
        report = run_job(job_config(tmp_path / "out", scheduler_address=cluster.scheduler_address,
                                    rebalance=False), echo=lambda msg: None)
        m = prometheus_values(http_get(f"{base}/metrics"))
        assert "Bokeh" in http_get(f"{base}/pdbatch")  # the page came with the monitor
        # engine counters arrive with worker heartbeats (every 0.5 s): wait for the last one
        deadline = time.time() + 30
        while m['pdbatch_engine_tokens_total{role="prefill"}'] < report["prompt_tokens"] and time.time() < deadline:
            time.sleep(0.5)
            m = prometheus_values(http_get(f"{base}/metrics"))
    assert report["rows"] == 64 and report["kv_bytes_moved"] > 0
    assert m["pdbatch_rows_total"] == report["rows"]
    assert m["pdbatch_output_tokens_total"] == report["output_tokens"]
    assert m["pdbatch_kv_bytes_moved_total"] == report["kv_bytes_moved"]
    assert m["pdbatch_prompt_tokens_total"] == report["prompt_tokens"]
    assert m["pdbatch_rows_failed_total"] == report["rows_failed"] == 0
    assert m["pdbatch_job_rows_done"] == m["pdbatch_job_rows_expected"] == 64
    assert m["pdbatch_ttft_seconds_count"] == m["pdbatch_tpot_seconds_count"] == 64
    assert m['pdbatch_ttft_seconds_bucket{le="+Inf"}'] == 64
    assert m['pdbatch_workers{role="prefill"}'] == m['pdbatch_workers{role="decode"}'] == 1
    assert m["pdbatch_job_role_switches"] == 0
    assert m['pdbatch_engine_tokens_total{role="prefill"}'] == report["prompt_tokens"]
    assert m['pdbatch_engine_tokens_total{role="decode"}'] > 0
    assert m['pdbatch_busy_seconds_total{role="prefill"}'] > 0 and m['pdbatch_busy_seconds_total{role="decode"}'] > 0
    assert m['pdbatch_kv_budget_bytes{role="decode"}'] == 2 * 2**30
    for name in ("queue_depth", "kv_held_bytes", "kv_held_packets"):
        assert f'pdbatch_{name}{{role="prefill"}}' in m and f'pdbatch_{name}{{role="decode"}}' in m
    for name in ("active_sequences", "waiting_sequences", "kv_used_bytes", "kv_incoming_bytes"):
        assert f'pdbatch_{name}{{role="decode"}}' in m


# --- scheduler state, without a cluster ---------------------------------------------------------------
def test_monitor_counters_add_up_over_jobs():
    mon = Monitor()
    snap = {"job": "a", "rows": 10, "rows_expected": 20, "rows_this_run": 10, "rows_failed": 1,
            "prompt_tokens": 100, "output_tokens": 50, "kv_bytes": 1000}
    mon.receive(snap, {"ttft": [0.2, 0.3], "tpot": [0.01]})
    mon.receive({**snap, "time": 2, "rows": 20, "rows_this_run": 20, "output_tokens": 90}, {"ttft": [0.4]})
    assert mon.counter("rows_this_run") == 20 and mon.counter("output_tokens") == 90
    mon.receive({**snap, "time": 1}, {"tpot": [0.02]})  # overtaken by a newer one: only its samples count
    assert mon.counter("rows_this_run") == 20 and mon.tpot.count == 2
    mon.receive({**snap, "job": "b", "rows": 5, "rows_this_run": 5, "output_tokens": 7}, {})
    assert mon.counter("rows_this_run") == 25 and mon.counter("output_tokens") == 97
    assert mon.counter("kv_bytes") == 2000 and mon.ttft.count == 3 and mon.tpot.count == 2


def test_histogram_buckets_follow_prometheus_le_semantics():
    h = Histogram(bounds=(0.1, 1.0))
    h.observe([0.05, 0.1, 0.5, 1.0, 3.0])
    assert h.cumulative() == [("0.1", 2), ("1.0", 4), ("+Inf", 5)]
    assert h.sum == pytest.approx(4.65)
    assert h.bars() == {"left": [0.01, 0.1, 1.0], "right": [0.1, 1.0, 10.0], "count": [2, 2, 1]}
    assert h.recent_quantile(50) == 0.5


def test_worker_metrics_are_installed_without_changing_the_dict_in_place():
    """A heartbeat may be iterating over worker.metrics, suspended at Dask's async RMM/GPU
    metric: changing that dict would fail the heartbeat and close the worker."""

    class FakeWorker:
        metrics = {"rmm": print}

    w = FakeWorker()
    before = w.metrics
    install_worker_metrics(w)
    assert before == {"rmm": print} and set(w.metrics) == {"rmm", "pdbatch"}


# --- terminal progress --------------------------------------------------------------------------------
SNAP = {"rows": 30, "rows_expected": 120, "output_tokens_per_s": 812.4, "eta_s": 95.0, "units_inflight": 4}


def test_progress_bar_draws_one_line_in_place():
    stream = io.StringIO()
    bar = ProgressBar(stream=stream, every_s=0)
    bar.show(SNAP)
    bar.show({**SNAP, "rows": 120, "eta_s": 0.0})
    bar.close()
    frames = stream.getvalue().split("\r")[1:]
    assert frames[0].startswith("[") and "30/120 rows" in frames[0] and "812 tok/s" in frames[0]
    assert "ETA 1m35s" in frames[0] and "\n" not in frames[0]
    assert "120/120 rows 100%" in frames[1] and frames[1].endswith("\n")


def test_progress_modes(monkeypatch):
    lines: list[str] = []
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal
    assert isinstance(make_display("auto", lines.append), ProgressLog)  # not a terminal: log lines
    assert isinstance(make_display("bar", lines.append), ProgressBar)
    log = ProgressLog(lines.append, every_s=0)
    log.show(SNAP)
    assert lines == ["pdbatch: 30/120 rows, 812 output tokens/s, ETA 1m35s, 4 units in flight"]
    quiet = make_display("none", lines.append)
    quiet.show(SNAP)
    quiet.close()
    assert len(lines) == 1
    assert (format_eta(None), format_eta(4), format_eta(3725)) == ("--", "4s", "1h02m")
