"""Prefill pacing in a fixed prefill/decode split: prefill no further ahead than decode has slots.

A row's first token comes out of its prefill, and its time per output token (TPOT) counts
every second from then to its last token. A prefill worker that runs ahead of the decode
workers' max_num_seqs slots leaves prefilled rows waiting (on the driver, or queued in a decode
engine) with their first token out, and that wait lands in their TPOT, most of all for short
outputs (measured, vLLM engine, 200 rows, fixed 1+1 split: TPOT p99 0.72 s, 0.16 s for rows that
never waited). vLLM's own scheduler keeps a request waiting before its prefill until a slot is
free, so the wait counts in TTFT; pacing does the same across workers: the next unit is
prefilled only when the decode workers' free slots, less the rows already prefilling or
waiting for a decoder, hold its rows.

A decode worker's occupied slots come from its heartbeat (decode_active + decode_waiting in
pdbatch's worker metrics), which has not yet seen rows routed to it in the last
HEARTBEAT_LAG_S, and never exceed the rows the driver routed there and that are not yet
written. With no heartbeat yet the routed rows count. With no decode worker at all nothing is
paced: prefilled KV waits on its prefill worker for decoders to join, as before.

A unit takes a while from the start of its prefill to its packets' arrival on a decode worker,
and rows finish there meanwhile: the slots they free count too (DecodeRate: rows written per
second times a unit's prefill time, both measured as the job runs; nothing before the first
measurements), so the decoders stay full without rows waiting.

With rebalancing on (roles.py) a worker short of prefill work decodes instead, so there is no
pacing there.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

HEARTBEAT_LAG_S = 2.0  # a heartbeat every 0.5 s, plus fetching the packets into the engine


@dataclass
class DecodeSlots:
    """One decode worker as the driver sees it."""
    routed_rows: int  # rows of units routed here and not yet written
    recent_rows: int  # of those, rows routed in the last HEARTBEAT_LAG_S
    engine_rows: int | None  # rows in its engine at the last heartbeat (active + waiting); None: none yet

    def occupied(self) -> int:
        if self.engine_rows is None:
            return self.routed_rows
        return min(self.routed_rows, self.engine_rows + self.recent_rows)


@dataclass
class DecodeRate:
    """Slots the decode workers will free while a unit starting prefill now is prefilled."""
    window_s: float = 30.0
    prefill_s: float | None = None  # moving average of a unit's time from prefill start to its KV
    written: deque = field(default_factory=deque)  # (time, rows) of units written, last window_s

    def unit_prefilled(self, seconds: float) -> None:
        a = self.prefill_s
        self.prefill_s = seconds if a is None else 0.8 * a + 0.2 * seconds

    def unit_written(self, rows: int, now: float) -> None:
        self.written.append((now, rows))

    def freed_during_prefill(self, now: float) -> int:
        while self.written and now - self.written[0][0] > self.window_s:
            self.written.popleft()
        if self.prefill_s is None or len(self.written) < 2:
            return 0
        # the first unit in the window marks its start: its rows finished before it
        rows = sum(n for _, n in list(self.written)[1:])
        return int(rows / max(now - self.written[0][0], 1e-3) * self.prefill_s)


def may_prefill(rows: int, decoders: list[DecodeSlots], committed_rows: int, max_num_seqs: int,
                freed_soon: int = 0) -> bool:
    """Whether a unit of `rows` may start prefill now. `committed_rows`: rows prefilling or
    prefilled and waiting for a decoder, which will take slots before this unit; `freed_soon`:
    slots that free before its KV is ready (DecodeRate). A unit larger than every slot together
    goes once all are free, so a job always moves."""
    if not decoders:
        return True
    free = sum(max(0, max_num_seqs - d.occupied()) for d in decoders) - committed_rows + freed_soon
    return free >= min(rows, max_num_seqs * len(decoders))
