"""Prefill at a lower CPU priority than decode, on a CPU worker that does both.

A serving engine runs its decoding requests before its waiting ones: their first token is out and
every second they wait counts in their TPOT. On a CPU worker with both roles (rebalancing), the
prefill passes run in a Dask thread and the decode steps in the engine's thread, side by side on
the same cores; the OS would share those cores evenly. Run the prefill passes in a thread with a
higher nice value instead, and decode steps take the cores they need while prefill takes what is
left: a decoder can then prefill in its spare time, its rows going on at a pace it sets (the
decode loop leaves part of the time to such a pass: decode.DECODE_SHARE_BESIDE_PREFILL). Linux
sets nice values per thread; elsewhere the thread runs at normal priority.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor

# added to the worker's own nice value: CFS weight 110 against 1024, decode gets ~90% of a shared core
PREFILL_NICE = 10


def _lower_priority() -> None:
    try:  # an unprivileged thread can raise its nice value, not lower it back: a thread of its own
        tid = threading.get_native_id()  # 19 is the lowest priority
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + PREFILL_NICE))
    except (AttributeError, OSError):
        pass


class LowPriorityPrefill:
    """One long-lived thread, at PREFILL_NICE, that runs prefill passes for the calling thread."""

    def __init__(self):
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="pdbatch-prefill", initializer=_lower_priority)

    def run(self, fn, *args):
        return self._pool.submit(fn, *args).result()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
