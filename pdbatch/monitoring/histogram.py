"""Latency distributions kept on the scheduler: fixed buckets (what Prometheus histograms
want, constant memory however long the job) plus a window of recent samples for p50/p99."""

from __future__ import annotations

import bisect
from collections import deque

from .report import percentile

# seconds; spans a GPU's per-token latency (ms) up to a CPU's TTFT under load (minutes)
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   25.0, 50.0, 100.0, 250.0, 500.0)


class Histogram:
    def __init__(self, bounds=LATENCY_BUCKETS, recent: int = 2048):
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)  # the last bucket is +Inf
        self.count = 0
        self.sum = 0.0
        self.recent: deque[float] = deque(maxlen=recent)

    def observe(self, values) -> None:
        for v in values:
            v = float(v)
            self.counts[bisect.bisect_left(self.bounds, v)] += 1
            self.count += 1
            self.sum += v
            self.recent.append(v)

    def cumulative(self) -> list[tuple[str, int]]:
        """Prometheus buckets: (upper bound, samples <= it), ending with +Inf == count."""
        out, running = [], 0
        for bound, n in zip((*map(repr, self.bounds), "+Inf"), self.counts):
            running += n
            out.append((bound, running))
        return out

    def bars(self) -> dict:
        """The non-empty buckets as bars for a plot: left and right edges (seconds) and counts;
        the open-ended first and last buckets are drawn one decade wide."""
        lo = (self.bounds[0] / 10, *self.bounds)
        hi = (*self.bounds, self.bounds[-1] * 10)
        keep = [i for i, n in enumerate(self.counts) if n]
        return {"left": [lo[i] for i in keep], "right": [hi[i] for i in keep],
                "count": [self.counts[i] for i in keep]}

    def recent_quantile(self, q: float) -> float | None:
        return percentile(list(self.recent), q)
