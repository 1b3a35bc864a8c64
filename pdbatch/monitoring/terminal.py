"""Progress on the terminal: a live bar (rows, output tokens/s, ETA) redrawn in place when
stderr is a terminal, a line every 10 s when it is not (logs, pipes), or nothing
(`--progress bar | log | none`; `auto` picks bar or log). Each display takes the driver's
snapshots (pdbatch.monitoring.progress.snapshot)."""

from __future__ import annotations

import shutil
import sys
import time


def make_display(kind: str, echo):
    if kind == "auto":
        kind = "bar" if sys.stderr.isatty() else "log"
    return {"bar": ProgressBar, "log": ProgressLog}.get(kind, NoDisplay)(echo)


def format_eta(seconds: float | None) -> str:
    if seconds is None:
        return "--"
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


class NoDisplay:
    def __init__(self, echo=None):
        pass

    def show(self, snap: dict) -> None:
        pass

    def close(self) -> None:
        pass


class ProgressLog(NoDisplay):
    """A line every `every_s` seconds: for logs and pipes (stderr is not a terminal)."""

    def __init__(self, echo, every_s: float = 10.0):
        self.echo, self.every_s = echo, every_s
        self.last = time.time()

    def show(self, snap: dict) -> None:
        if time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        self.echo(f"pdbatch: {snap['rows']}/{snap['rows_expected']} rows, "
                  f"{snap['output_tokens_per_s']:.0f} output tokens/s, ETA {format_eta(snap['eta_s'])}, "
                  f"{snap['units_inflight']} units in flight")


class ProgressBar(NoDisplay):
    """One live line on the terminal, redrawn in place (stderr), at most 5 times a second."""

    def __init__(self, echo=None, stream=None, every_s: float = 0.2):
        self.stream = stream or sys.stderr
        self.every_s = every_s
        self.last = 0.0
        self.width = 0  # length of the line on screen; 0: nothing drawn

    def show(self, snap: dict) -> None:
        done = snap["rows"] >= snap["rows_expected"]
        if not done and time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        line = self.line(snap, shutil.get_terminal_size((100, 20)).columns)
        self.stream.write("\r" + line.ljust(self.width))  # blank what a longer line left
        self.stream.flush()
        self.width = len(line)

    @staticmethod
    def line(snap: dict, columns: int) -> str:
        total = max(snap["rows_expected"], 1)
        frac = min(snap["rows"] / total, 1.0)
        text = (f" {snap['rows']}/{snap['rows_expected']} rows {frac:4.0%} | "
                f"{snap['output_tokens_per_s']:.0f} tok/s | ETA {format_eta(snap['eta_s'])}")
        width = max(10, min(40, columns - len(text) - 3))
        filled = int(frac * width)
        return f"[{'#' * filled}{'.' * (width - filled)}]{text}"[:max(columns - 1, 20)]

    def close(self) -> None:
        if self.width:
            self.stream.write("\n")
            self.stream.flush()
            self.width = 0
