"""How much decode work each worker has left: what rebalancing's fair shares are counted in.

A unit's decode work is its rows' max_new_tokens, known when it is routed. A unit that has
decoded for a while has less left, and counting it whole made a worker that took the first
units look busy long after they were mostly done: the last units all went to the other
decoder, and the job waited on it (measured, 60-row uniform bench: one worker idle for the
last 3.3 s of 18.9 s). Here a worker's progress is the tokens its engine generated (its
heartbeat's `decode_tokens` counter) less those of the units already written there, so

    left(worker) = work routed there and not yet written - progress(worker), at least 0.

The heartbeat lags the writes by up to a beat; the clamp makes that err on the side of "busy".
The counter runs from the engine's start: an engine that served an earlier job on the same
cluster counts from the first heartbeat this job sees (before anything was routed to it).
"""

from __future__ import annotations


class DecodeProgress:
    def __init__(self) -> None:
        self.first: dict[str, int] = {}  # address -> its engine's counter when first seen
        self.generated: dict[str, int] = {}  # address -> decode tokens generated since then
        self.written: dict[str, int] = {}  # address -> of those, tokens of units written since

    def heartbeat(self, addr: str, decode_tokens: int) -> None:
        self.generated[addr] = decode_tokens - self.first.setdefault(addr, decode_tokens)

    def unit_written(self, addr: str, summary: dict) -> None:
        """A unit decoded on `addr` is written: its decode tokens (each ok row's first token came
        from prefill) are no longer part of that worker's progress on open units."""
        ok_rows = summary.get("rows", 0) - summary.get("errors", 0)
        self.written[addr] = self.written.get(addr, 0) + max(0, summary.get("output_tokens", 0) - ok_rows)

    def left(self, addr: str, routed_work: int) -> int:
        progress = self.generated.get(addr, 0) - self.written.get(addr, 0)
        return max(0, routed_work - max(0, progress))
