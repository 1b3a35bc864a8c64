"""The end-of-run summary: `_pdbatch/report.json` and the lines printed on the terminal."""

from __future__ import annotations

import math
import random
from array import array
from collections import deque


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no values."""
    if not values:
        return None
    v = sorted(values)
    k = (len(v) - 1) * q / 100
    lo, hi = math.floor(k), math.ceil(k)
    return v[lo] + (v[hi] - v[lo]) * (k - lo)


class Reservoir:
    """At most `cap` samples: all of them up to the cap, then a uniform random sample
    (Vitter's algorithm R, fixed seed), so the driver's memory does not grow with the rows while
    percentiles stay exact for jobs up to `cap` rows and close beyond (at 50,000 samples the
    p99's own sampling error is under 0.1 percentile points). Samples live in a C double array,
    8 bytes each rather than a list's 32. `since(n)` gives what arrived after the first n samples
    (the newest `recent` of them), for incremental readers."""

    def __init__(self, cap: int = 50_000, recent: int = 20_000, seed: int = 0):
        self.samples = array("d")
        self.cap, self.seen = cap, 0
        self.recent: deque = deque(maxlen=recent)
        self._rng = random.Random(seed)

    def __len__(self) -> int:
        return len(self.samples)

    def __iter__(self):
        return iter(self.samples)

    def __iadd__(self, values):
        for v in values:
            v = float(v)
            self.seen += 1
            self.recent.append(v)
            if len(self.samples) < self.cap:
                self.samples.append(v)
            else:
                j = self._rng.randrange(self.seen)
                if j < self.cap:
                    self.samples[j] = v
        return self

    def since(self, n: int) -> list:
        if self.seen <= self.cap:
            return self.samples[n:].tolist()
        k = min(self.seen - n, len(self.recent))
        return list(self.recent)[len(self.recent) - k:] if k > 0 else []


class RunTotals:
    """Aggregates the per-unit summaries returned by the write tasks."""

    def __init__(self):
        self.units = 0
        self.rows = self.errors = self.prompt_tokens = self.output_tokens = self.kv_bytes = 0
        self.ttft = Reservoir()
        self.tpot = Reservoir()
        self.kv_transfer_s = Reservoir(recent=1)  # one sample per unit
        self.rows_by_decode_worker: dict[str, int] = {}
        self.rows_by_prefill_worker: dict[str, int] = {}

    def add(self, s: dict) -> None:
        self.units += 1
        self.rows += s["rows"]
        self.errors += s["errors"]
        self.prompt_tokens += s["prompt_tokens"]
        self.output_tokens += s["output_tokens"]
        self.kv_bytes += s["kv_bytes"]
        self.ttft += s["ttft_s"]
        self.tpot += s["tpot_s"]
        if s.get("kv_transfer_s"):
            self.kv_transfer_s += [s["kv_transfer_s"]]
        for key, target in (("rows_by_decode_worker", self.rows_by_decode_worker),
                            ("rows_by_prefill_worker", self.rows_by_prefill_worker)):
            for w, n in s.get(key, {}).items():
                target[w] = target.get(w, 0) + n


def build_report(totals: RunTotals, *, this_run: RunTotals, wall_s: float, mode: str, workers: dict,
                 dashboard: str | None, total_rows: int, resumed_units: int, dask_transfer_bytes: int,
                 protocol: str) -> dict:
    ttft50 = percentile(totals.ttft, 50)
    transfer50 = percentile(this_run.kv_transfer_s, 50)
    return {
        "rows": totals.rows,
        "rows_expected": total_rows,
        "rows_failed": totals.errors,
        "prompt_tokens": totals.prompt_tokens,
        "output_tokens": totals.output_tokens,
        # throughput counts only what this invocation computed, over its own wall time
        "wall_s": round(wall_s, 3),
        "rows_this_run": this_run.rows,
        "output_tokens_this_run": this_run.output_tokens,
        "output_tokens_per_s": round(this_run.output_tokens / wall_s, 2) if wall_s > 0 else None,
        "ttft_p50_s": ttft50,
        "ttft_p99_s": percentile(totals.ttft, 99),
        "tpot_p50_s": percentile(totals.tpot, 50),
        "tpot_p99_s": percentile(totals.tpot, 99),
        "kv_bytes_moved": totals.kv_bytes,
        "dask_transfer_bytes_this_run": dask_transfer_bytes,
        "kv_transfer_p50_s": transfer50,
        "kv_transfer_share_of_ttft_p50": (transfer50 / ttft50) if transfer50 and ttft50 else None,
        "mode": mode,
        "protocol": protocol,
        "workers": workers,
        "rows_by_prefill_worker": totals.rows_by_prefill_worker,
        "rows_by_decode_worker": totals.rows_by_decode_worker,
        "units": totals.units,
        "units_resumed": resumed_units,
        "dashboard": dashboard,
    }


def summary_lines(r: dict) -> list[str]:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.1f} ms"

    return [
        f"rows           {r['rows']}/{r['rows_expected']} ({r['rows_failed']} with errors)",
        f"tokens         {r['prompt_tokens']} prompt, {r['output_tokens']} output",
        f"wall time      {r['wall_s']:.1f} s, {r['output_tokens_per_s']} output tokens/s this run",
        f"TTFT           p50 {ms(r['ttft_p50_s'])}, p99 {ms(r['ttft_p99_s'])}",
        f"TPOT           p50 {ms(r['tpot_p50_s'])}, p99 {ms(r['tpot_p99_s'])}",
        f"KV moved       {r['kv_bytes_moved'] / 2**20:.1f} MiB between workers",
        f"mode           {r['mode']} over {r['protocol']}, workers {r['workers']}",
        f"dashboard      {r['dashboard']}",
    ]
