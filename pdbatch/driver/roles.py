"""Prefill and decode roles: a driver-side notion, decided per worker and changed while the job runs.

A worker's Dask resources (`prefill=1` / `decode=1`) are fixed at its start (dask#6677), and the
driver already places every task on an address of its choosing, so a role here is only "which
queue this worker takes its next unit from". With rebalancing on, every worker's engine is built
for both phases (worker.EngineHost), and the driver moves workers between the two queues:

- the queues live on the driver, not on the workers: a prefill worker gets at most
  PREFILL_DEPTH units at a time (one running, one ready), and a decode worker takes another
  unit only while it holds less than its fair share of the decode work (rows decoding or
  waiting for a decoder, divided by the workers that could decode; by the decoders alone while
  units wait to be prefilled, as the prefill workers go on prefilling), within max_num_seqs and
  its KV budget; what no worker has taken yet can go to whichever worker changes role (a unit
  whose KV is on a prefill worker running its last prefill, nothing queued, waits for that
  worker to decode it, unless a decoder has nothing to decode);
- prefill -> decode: a prefill worker with nothing running and nothing left to prefill (the
  prefill queue is empty: the window is full of prefilled units, or the input is done) while
  prefilled units wait for a decoder becomes a decode worker; it decodes the units it holds
  first, where their KV already is (nothing moves over the network);
- prefill -> decode, while prefill work remains: a prefilled unit has waited for a decoder
  longer than a tenth of a unit's decode time (every decoder holds its share): the
  prefill worker holding the most waiting units (then the one with the fewest prefill units in
  flight) becomes a decode worker, but never the last one prefilling. Its first token is out,
  and the wait counts in the row's time per output token: this keeps decode prompt when
  prefill is the bottleneck;
- decode -> prefill: units wait to be prefilled, every prefill worker is full and no prefilled
  unit waits for a decoder: a decode worker with no rows left (drained) becomes a prefill
  worker; if no worker prefills at all (whatever waits for a decoder: decoders that each hold
  their share would otherwise keep the prefill queue waiting until they drain), a drained
  decode worker switches at once, else the least-loaded one after a patience of a quarter of a
  unit's decode time (its remaining rows finish in its engine alongside the prefill, as in
  colocated mode). A unit's decode time is measured as the job runs (a moving average over the
  units decoded); until one is, it is estimated from the rows' own lengths (unit_decode_estimate).
- lent, no switch: units wait for prefill and every prefill worker holds its units: a decode
  worker whose engine prefills at a lower CPU priority than it decodes (the built-in engine on
  CPU, engines/builtin/priority.py) takes one unit at a time in its spare time, its decode going
  on as before; with decode tasks started early (early_decode.py) its rows do not wait for it.

Between the two, both queues can never be starved at once while the other has work, and a
worker switches only when it would otherwise idle (or, for the fallback, when prefill would).
The rules read only counts the driver keeps (O(workers + units in flight) per tick), move at
most as many workers as there is work for, and need nothing from any engine beyond the seam:
they hold for many workers over several nodes as for two on one host. Rates are measured as
the job runs (how long units take to decode) instead of a calibration before it starts: that
costs no start-up time, follows the job's own prompts as they change, and works for any engine.

With rebalancing off, the split is exactly the one the workers were started with.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

from ..monitoring.metrics import ROLES

log = logging.getLogger("pdbatch")

PREFILL_DEPTH = 2  # prefill units handed to one worker at once: one running, one ready
# Before any unit was decoded, a unit's decode time is estimated as its longest row's
# max_new_tokens decode steps of PRIOR_STEP_S each: a decode step takes tens of milliseconds, for
# a small model on a CPU core (bench-30m: 20-90 ms for 1-32 rows) as for a 7-8B one on a GPU. The
# patience then follows the job's own output lengths: with a constant 2 s instead, a 60-row job
# of 16-256 output tokens (bench `uniform`) switched a prefill worker to decode after a 0.2-0.5 s
# wait in 5 of 16 runs, which took 26.5 s on average against 23.9 s: that worker then prefilled
# its held units beside its decode, and one decoder took 40-50 of the 60 rows (docs/benchmarks.md).
PRIOR_STEP_S = 0.04
PRIOR_UNIT_TOKENS = 50  # a unit's longest row when the driver knows none (2 s, as before)
SWITCH_LOG_CAP = 2000  # switches kept for the report (the count is always exact)
DEFAULT_UNIT_ROWS_CAP = 128  # the largest automatic unit: a decode batch's worth, a sensible resume grain
# Three units a worker, not four: in disaggregated mode a unit's rows reach their decoder together
# and decode as one batch, and a CPU decode step costs nearly the same for 1 row as for 8 (it
# reads every weight: bench-30m 20 ms at 1 row, 38 ms at 8). On the 2-core bench (disaggregated/
# colocated tok/s, every run of both sizes): summarize 0.84-1.12 with units of 5-6 rows against
# 0.78-0.94 with 4, generate 0.95-1.12 against 0.94-0.96; at 60 rows (10 against 8) throughput
# did not clearly move (0.79-1.00 against 0.87-0.95) and TPOT p99 fell from 1.19-1.52x colocated
# to 0.71-1.18x. Units of 8 rows (2 a worker) lost summarize's TPOT p99 win (0.96-1.01x
# colocated). docs/benchmarks.md has the runs.
UNITS_PER_WORKER = 3


def auto_unit_rows(total_rows: int, workers: int, cap: int = DEFAULT_UNIT_ROWS_CAP) -> int:
    """Rows per unit when --unit-rows is not given: at least UNITS_PER_WORKER units per worker, so
    prefill and decode overlap from the first unit and every worker gets work early, whatever
    the input size; at most `cap` rows (big inputs: few manifest entries, a resume loses little)."""
    return max(1, min(cap, total_rows // (UNITS_PER_WORKER * max(1, workers))))


@dataclass
class View:
    """What the driver knows this tick, by worker address."""
    prefill_units: dict[str, int]  # prefill tasks handed to each worker, not yet finished
    decode_rows: dict[str, int]  # rows routed to each worker for decode, not yet written
    held: dict[str, int]  # prefilled units waiting for a decoder, by the worker holding their KV
    queued_prefill: int  # units waiting for a prefill worker
    waiting_decode: int  # prefilled units waiting for a decoder
    oldest_wait_s: float = 0.0  # how long the longest-waiting prefilled unit has waited
    unit_tokens: int = 0  # the longest max_new_tokens of a row in flight (0: not known)


@dataclass
class Roles:
    rebalance: bool
    started: float = field(default_factory=time.time)
    role: dict[str, str] = field(default_factory=dict)  # address -> role
    names: dict[str, str] = field(default_factory=dict)
    initial: dict[str, str] = field(default_factory=dict)  # worker name -> its first role
    switches: list[dict] = field(default_factory=list)
    switch_count: int = 0
    recent: deque = field(default_factory=lambda: deque(maxlen=20))  # for the dashboard
    unit_decode_s: float | None = None  # moving average of a unit's decode time
    units_lent: int = 0  # units prefilled by a decode worker in its spare time (prefill_helpers)
    _starved_since: float | None = None

    # --- membership ---------------------------------------------------------------------------
    def sync(self, workers: dict[str, dict]) -> None:
        """Take in workers that joined (their role from their resources) and forget those gone."""
        for addr in [a for a in self.role if a not in workers]:
            del self.role[addr]
        for addr, w in workers.items():
            if addr in self.role:
                continue
            res = w.get("resources") or {}
            have = [r for r in ROLES if res.get(r, 0) > 0]
            if len(have) == 1:
                role = have[0]
            elif self.rebalance:  # no role resource (a plain `dask worker`): the rarer role
                role = min(ROLES, key=lambda r: (sum(v == r for v in self.role.values()), r))
            else:
                continue  # without rebalancing, a worker without a role resource takes no work
            self.role[addr] = role
            self.names[addr] = w["name"]
            self.initial.setdefault(w["name"], role)

    def pool(self, role: str, live) -> list[str]:
        return [a for a, r in self.role.items() if r == role and a in live]

    def by_name(self) -> dict[str, str]:
        return {self.names.get(a, a): r for a, r in sorted(self.role.items(), key=lambda x: self.names.get(x[0], x[0]))}

    def count(self) -> dict[str, int]:
        return {r: sum(v == r for v in self.role.values()) for r in ROLES}

    # --- measurements -------------------------------------------------------------------------
    def unit_decoded(self, seconds: float) -> None:
        a = self.unit_decode_s
        self.unit_decode_s = seconds if a is None else 0.8 * a + 0.2 * seconds

    def unit_decode_estimate(self, unit_tokens: int = 0) -> float:
        """A unit's decode time: measured once a unit was decoded, else from its rows' length."""
        if self.unit_decode_s is not None:
            return self.unit_decode_s
        return PRIOR_STEP_S * (unit_tokens or PRIOR_UNIT_TOKENS)

    # --- lending ------------------------------------------------------------------------------
    def prefill_helpers(self, prefill_units: dict[str, int], able: set[str], live) -> list[str]:
        """Units wait for prefill and every prefill worker holds PREFILL_DEPTH of them: the decode
        workers whose engine prefills at a lower CPU priority than it decodes (`able`:
        engines/builtin/priority.py) take one unit at a time, without a switch, in their spare
        time; its KV is then decoded where it is."""
        if any(prefill_units.get(a, 0) < PREFILL_DEPTH for a in self.pool("prefill", live)):
            return []
        return [a for a in self.pool("decode", live) if a in able and not prefill_units.get(a)]

    # --- switching ----------------------------------------------------------------------------
    def switch(self, addr: str, to: str, reason: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        frm = self.role[addr]
        self.role[addr] = to
        self.switch_count += 1
        entry = {"t_s": round(now - self.started, 3), "worker": self.names.get(addr, addr),
                 "from": frm, "to": to, "reason": reason}
        if len(self.switches) < SWITCH_LOG_CAP:
            self.switches.append(entry)
        self.recent.append(entry)
        log.info("pdbatch: worker %s %s -> %s (%s)", entry["worker"], frm, to, reason)

    def rebalance_tick(self, v: View, live, now: float | None = None) -> None:
        if not self.rebalance:
            return
        now = time.time() if now is None else now
        prefill, decode = self.pool("prefill", live), self.pool("decode", live)
        if v.waiting_decode and not v.queued_prefill:
            self._starved_since = None
            idle = [a for a in prefill if not v.prefill_units.get(a)]
            idle.sort(key=lambda a: (-v.held.get(a, 0), self.names.get(a, a)))  # KV holders first
            for a in idle[:v.waiting_decode]:
                self.switch(a, "decode", "nothing to prefill, prefilled units wait for a decoder", now)
            return
        if v.queued_prefill and not prefill:
            self._no_prefill(v, decode, now)  # whatever waits for a decoder: someone must prefill
            return
        if v.waiting_decode:
            self._starved_since = None
            # never the last prefill worker while units wait for prefill (the queue would stall
            # behind decoders that each hold their share); prefill work can remain only here
            if len(prefill) > 1 and v.oldest_wait_s >= 0.1 * self.unit_decode_estimate(v.unit_tokens):
                a = min(prefill, key=lambda a: (-v.held.get(a, 0), v.prefill_units.get(a, 0), self.names.get(a, a)))
                self.switch(a, "decode", f"a prefilled unit waited {v.oldest_wait_s:.1f}s for a decoder", now)
            return
        if not v.queued_prefill:
            self._starved_since = None
            return
        # units wait for prefill and no prefilled unit waits for decode
        if any(v.prefill_units.get(a, 0) < PREFILL_DEPTH for a in prefill):
            self._starved_since = None
            return  # a prefill worker has room: the units go there this tick
        need = -(-v.queued_prefill // PREFILL_DEPTH)
        for a in self._drained(v, decode)[:need]:
            self.switch(a, "prefill", "decode drained, units wait for prefill", now)
        self._starved_since = None

    def _drained(self, v: View, decode: list[str]) -> list[str]:
        """Decode workers with no rows left, by name."""
        return sorted((a for a in decode if not v.decode_rows.get(a)), key=lambda a: self.names.get(a, a))

    def _no_prefill(self, v: View, decode: list[str], now: float) -> None:
        """Units wait for prefill and no worker prefills: a drained decode worker switches at
        once; else the least-loaded one after a patience (its rows finish in its engine
        alongside the prefill, as in colocated mode)."""
        drained = self._drained(v, decode)
        if drained:
            self.switch(drained[0], "prefill", "decode drained, units wait for prefill", now)
            self._starved_since = None
            return
        if not decode:
            return
        self._starved_since = self._starved_since or now
        patience = 0.25 * self.unit_decode_estimate(v.unit_tokens)
        if now - self._starved_since >= patience:
            a = min(decode, key=lambda a: (v.decode_rows.get(a, 0), self.names.get(a, a)))
            self.switch(a, "prefill", f"no worker prefills and units wait for prefill for {patience:.1f}s", now)
            self._starved_since = None

    # --- report -------------------------------------------------------------------------------
    def report(self) -> dict:
        return {"rebalance": self.rebalance, "initial": dict(sorted(self.initial.items())),
                "final": self.by_name(), "switches": self.switch_count, "units_lent": self.units_lent,
                "unit_decode_s": None if self.unit_decode_s is None else round(self.unit_decode_s, 3)}

    def snapshot(self) -> dict:
        """For the dashboard (monitoring/progress.snapshot): current roles and recent switches."""
        return {"roles": self.by_name(), "role_switches": self.switch_count, "recent_switches": list(self.recent),
                "rebalance": self.rebalance}
