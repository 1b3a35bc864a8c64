"""The Bokeh document behind the dashboard's /pdbatch page: is prefill or decode the
bottleneck, and how far along is the job?

Everything it shows comes from the scheduler's pdbatch monitor (pdbatch.monitoring.monitor): each open
page polls it once a second and streams only the new time-series points to the browser.
Data sources carry `name`s (pdbatch-series, pdbatch-roles, ...) so tests and scripts can find
them in the browser's Bokeh document.
"""

from __future__ import annotations

import math

from bokeh.layouts import column, gridplot
from bokeh.models import ColumnDataSource, DataRange1d, Div, NumeralTickFormatter, Range1d
from bokeh.plotting import figure

from .metrics import ROLES
from .terminal import format_eta

UPDATE_MS = 1000
HISTORY_POINTS = 3600
SERIES = ("prefill_tokens_per_s", "decode_tokens_per_s", "output_tokens_per_s", "prefill_queue",
          "decode_queue", "decode_active", "decode_waiting", "kv_held_prefill", "kv_held_decode",
          "kv_incoming", "kv_bytes_per_s", "ttft_p50", "ttft_p99", "tpot_p50", "tpot_p99",
          "prefill_busy", "decode_busy", "prefill_workers", "decode_workers")
COLORS = {"prefill": "#1f77b4", "decode": "#ff7f0e", "other": "#2ca02c", "dim": "#9467bd"}


def pdbatch_doc(monitor, scheduler, extra, doc) -> None:
    """Bokeh's page function (the dashboard passes scheduler, extra, doc); `monitor` is the
    scheduler's pdbatch monitor, bound by pdbatch.monitoring.dashboard.add_page."""
    page = PdbatchPage(monitor)
    doc.title = "Dask: pdbatch"
    doc.add_root(page.root)
    doc.add_periodic_callback(page.update, UPDATE_MS)
    page.update()
    try:  # the dashboard's own header and navigation bar
        from distributed.dashboard.components.scheduler import BOKEH_THEME, env

        doc.template = env.get_template("simple.html")
        doc.template_variables.update(extra)
        doc.theme = BOKEH_THEME
    except ImportError:
        pass


def _timeseries(title: str, y_label: str, x_range, **kw):
    return figure(title=title, x_axis_type="datetime", x_range=x_range, height=230, sizing_mode="stretch_width",
                  tools="pan,wheel_zoom,box_zoom,reset", toolbar_location="above", y_axis_label=y_label, **kw)


def _histogram(title: str, name: str):
    src = ColumnDataSource({"left": [], "right": [], "count": []}, name=name)
    fig = figure(title=title, x_axis_type="log", height=230, sizing_mode="stretch_width",
                 x_axis_label="seconds", y_axis_label="rows", tools="pan,wheel_zoom,reset",
                 toolbar_location="above")
    fig.quad(left="left", right="right", top="count", bottom=0, source=src, color=COLORS["other"], alpha=0.7)
    return fig, src


def _role_label(role: str, workers: int, busy: float) -> str:
    return f"{role}: {workers} worker{'' if workers == 1 else 's'}, {busy:.0%} busy"


def roles_html(job: dict) -> str:
    """Every worker's current role and the latest switches (newest first), from the job snapshot."""
    roles = job.get("roles")
    if not roles:
        return ""
    by_role = {r: sorted(w for w, role in roles.items() if role == r) for r in ROLES}
    now = " &middot; ".join(f"<b>{r}</b> ({len(ws)}): {', '.join(ws) or '-'}" for r, ws in by_role.items())
    state = "rebalancing on" if job.get("rebalance") else "rebalancing off (fixed split)"
    rows = "".join(f"<tr><td>{s['t_s']:.1f} s</td><td>{s['worker']}</td><td>{s['from']} &rarr; {s['to']}</td>"
                   f"<td>{s['reason']}</td></tr>" for s in reversed(job.get("recent_switches") or []))
    table = (f"<table><tr><th>at</th><th>worker</th><th>switch</th><th>why</th></tr>{rows}</table>"
             if rows else "")
    return (f"<div><b>Roles</b> ({state}, {job.get('role_switches', 0)} switches, units of "
            f"{job.get('unit_rows')} rows): {now}</div>{table}")


class PdbatchPage:
    def __init__(self, monitor):
        self.monitor = monitor
        self.last_time = 0.0
        self.summary = Div(name="pdbatch-summary", text="waiting for a pdbatch job", sizing_mode="stretch_width")
        # the driver's roles now and its latest switches (driver/roles.py)
        self.roles_now = Div(name="pdbatch-roles-now", text="", sizing_mode="stretch_width")
        self.progress = ColumnDataSource({"y": [0], "done": [0.0], "label": [""]}, name="pdbatch-progress")
        self.roles = ColumnDataSource({"role": list(ROLES), "busy": [0.0, 0.0], "label": ["", ""],
                                       "color": [COLORS[r] for r in ROLES]}, name="pdbatch-roles")
        self.series = ColumnDataSource({"time": [], **{k: [] for k in SERIES}}, name="pdbatch-series")
        # one time axis for every time-series plot (panning one pans all), the last 15 minutes
        self.time_range = DataRange1d(follow="end", follow_interval=15 * 60 * 1000, range_padding=0)
        self.ttft_fig, self.ttft = _histogram("TTFT distribution (rows)", "pdbatch-ttft")
        self.tpot_fig, self.tpot = _histogram("TPOT distribution (rows)", "pdbatch-tpot")
        self.root = column(self.summary, self._progress_figure(), self.roles_now,
                           gridplot([[self._roles_figure(), self._workers_figure()],
                                     [self._throughput_figure(), self._busy_figure()],
                                     [self._queue_figure(), self._kv_figure()],
                                     [self._kv_moved_figure(), self._latency_figure()],
                                     [self.ttft_fig, self.tpot_fig]], sizing_mode="stretch_width"),
                           sizing_mode="stretch_width")

    # --- figures -----------------------------------------------------------------------------
    def _progress_figure(self):
        fig = figure(title="Rows done", height=90, x_range=Range1d(0, 1), y_range=Range1d(-0.5, 0.5),
                     sizing_mode="stretch_width", tools="", toolbar_location=None)
        fig.hbar(y="y", left=0, right="done", height=0.8, source=self.progress, color=COLORS["other"])
        fig.text(x=0.01, y="y", text="label", source=self.progress, text_baseline="middle")
        fig.yaxis.visible = False
        fig.xaxis.formatter = NumeralTickFormatter(format="0%")
        return fig

    def _roles_figure(self):
        fig = figure(title="Busy share per role", y_range=list(ROLES), x_range=Range1d(0, 1), height=230,
                     sizing_mode="stretch_width", tools="", toolbar_location=None)
        fig.hbar(y="role", left=0, right="busy", height=0.6, source=self.roles, color="color", alpha=0.7)
        fig.text(x=0.01, y="role", text="label", source=self.roles, text_baseline="middle")
        fig.xaxis.formatter = NumeralTickFormatter(format="0%")
        return fig

    def _workers_figure(self):
        return self._lines(_timeseries("Workers per role (rebalancing moves them)", "workers", self.time_range), [
            ("prefill_workers", "prefill workers"), ("decode_workers", "decode workers")])

    def _busy_figure(self):
        fig = self._lines(_timeseries("Busy share per role", "share of the role's workers", self.time_range), [
            ("prefill_busy", "prefill busy"), ("decode_busy", "decode busy")])
        fig.yaxis.formatter = NumeralTickFormatter(format="0%")
        return fig

    def _lines(self, fig, keys_labels):
        colors = list(COLORS.values())
        for i, (key, label) in enumerate(keys_labels):
            fig.line("time", key, source=self.series, legend_label=label, color=colors[i % len(colors)],
                     line_width=2)
        fig.legend.location, fig.legend.click_policy = "top_left", "hide"
        fig.legend.background_fill_alpha = 0.5
        return fig

    def _throughput_figure(self):
        return self._lines(_timeseries("Throughput", "tokens/s", self.time_range), [
            ("prefill_tokens_per_s", "prefill tokens/s"), ("decode_tokens_per_s", "decode output tokens/s"),
            ("output_tokens_per_s", "rows' output tokens/s (written)")])

    def _queue_figure(self):
        return self._lines(_timeseries("Queues", "count", self.time_range), [
            ("prefill_queue", "prefill units queued/running"), ("decode_active", "decode active sequences"),
            ("decode_waiting", "decode sequences waiting for KV"), ("decode_queue", "decode units")])

    def _kv_figure(self):
        fig = self._lines(_timeseries("KV in flight", "bytes", self.time_range), [
            ("kv_held_prefill", "held on prefill workers"), ("kv_held_decode", "held on decode workers"),
            ("kv_incoming", "in transit")])
        fig.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
        return fig

    def _kv_moved_figure(self):
        fig = self._lines(_timeseries("KV moved prefill -> decode", "bytes/s", self.time_range),
                          [("kv_bytes_per_s", "KV bytes/s")])
        fig.yaxis.formatter = NumeralTickFormatter(format="0.0 b")
        return fig

    def _latency_figure(self):
        return self._lines(_timeseries("Latency (recent rows)", "seconds", self.time_range, y_axis_type="log"), [
            ("ttft_p50", "TTFT p50"), ("ttft_p99", "TTFT p99"), ("tpot_p50", "TPOT p50"), ("tpot_p99", "TPOT p99")])

    # --- updates -----------------------------------------------------------------------------
    def update(self) -> None:
        monitor = self.monitor
        new = [p for p in list(monitor.series) if p["time"] > self.last_time]
        if new:
            self.last_time = new[-1]["time"]
            data = {"time": [p["time"] * 1000 for p in new]}
            for k in SERIES:
                data[k] = [math.nan if p.get(k) is None else p[k] for p in new]
            self.series.stream(data, rollover=HISTORY_POINTS)
        latest = monitor.latest()
        self._update_summary(monitor.job, latest)
        self.roles.data = {"role": list(ROLES), "busy": [latest[f"{r}_busy"] for r in ROLES],
                           "color": [COLORS[r] for r in ROLES],
                           "label": [_role_label(r, latest[f"{r}_workers"], latest[f"{r}_busy"]) for r in ROLES]}
        self.ttft.data, self.tpot.data = monitor.ttft.bars(), monitor.tpot.bars()
        self.roles_now.text = roles_html(monitor.job)

    def _update_summary(self, job: dict, latest: dict) -> None:
        if not job:
            return
        rows, total = job["rows"], job["rows_expected"]
        frac = rows / total if total else 1.0
        state = "done" if rows >= total else f"ETA {format_eta(job.get('eta_s'))}"
        self.progress.data = {"y": [0], "done": [frac], "label": [f"{rows}/{total} rows ({frac:.0%}), {state}"]}
        self.summary.text = (
            f"<b>pdbatch job {job['job']}</b> ({job['mode']}): {rows}/{total} rows, {state}, "
            f"{job['units_inflight']} units in flight, {job['rows_failed']} rows failed &middot; "
            f"prefill {latest['prefill_tokens_per_s']:.0f} tok/s, decode {latest['decode_tokens_per_s']:.0f} "
            f"output tok/s, {latest['decode_active']} active sequences &middot; "
            f"KV moved {job['kv_bytes'] / 2**20:.1f} MiB")
