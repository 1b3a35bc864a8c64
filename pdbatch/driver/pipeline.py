"""The driver: feeds work units through prefill and decode workers and writes the results.

Scheduling decisions live here, on the client, because tasks with resource restrictions are
never queued by the Dask scheduler (everything submitted is handed to workers at once):
- a window of at most `max_inflight_units` units is in flight, so KV in memory stays bounded
  however large the input is;
- roles are the driver's (roles.py): with rebalancing on (the default) every worker can do both
  phases and moves between the prefill and the decode queue as the work needs; units then wait
  on the driver (a prefill worker gets at most roles.PREFILL_DEPTH units, a decode worker at
  most its fair share of the decode work, its own prefilled units first) so that whichever
  worker changes role finds work (a decode worker whose engine prefills at a low CPU priority
  also takes one unit when every prefill worker holds its units); with rebalancing off, what
  follows holds as written;
- a unit's prefill goes to the prefill worker with the fewest units in progress; in a fixed
  split, only once the decode workers' free slots hold its rows (pacing.py: a row waits for a
  slot before its prefill, not with its first token out);
- when its prefill finishes, its decode goes to the decode worker with the most free KV budget
  (its budget minus the KV already routed to it and not yet decoded); when every decode worker
  already has two units and its budget's worth of packets routed to it, the unit waits with its
  KV on its prefill worker: a decode worker holds its KV pool plus at most max(one budget, two
  units) of packets, whatever the window;
- on a worker, a ready decode or write task runs before a ready prefill (PHASE_PRIORITY), and a
  decode's rows start in the engine when the task turns ready, before a thread runs it
  (early_decode.py);
- the worker list is re-read continuously, so workers that join mid-job take work and workers
  that leave are no longer chosen;
- a unit whose task failed or whose prefill/decode worker left is started again from its
  prompts under new keys (Dask cannot recompute a task pinned to a dead worker), up to
  --max-attempts times; then its rows are probed one by one and a row that still fails is
  quarantined (quarantine.py). With no worker of a role for --worker-timeout, the job stops.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from distributed import Client, Future, wait

from ..config import JobConfig
from ..io.dataset import ROW_ID, InputPlan, WorkUnit, read_unit
from ..io.output import OutputDir, outputs_to_table, unit_summary, write_shard
from ..monitoring.report import RunTotals, build_report
from .cluster import scheduler_identity
from .decode_progress import DecodeProgress
from .pacing import HEARTBEAT_LAG_S, DecodeRate, DecodeSlots, may_prefill
from .quarantine import Quarantine, Suspect
from .roles import PREFILL_DEPTH, Roles, View
from .watchdog import Watchdog
from .tasks import decode_unit, generate_unit, prefill_unit, write_unit
from .worker import EngineHost, sent_transfer_bytes, worker_memory, worker_status

log = logging.getLogger("pdbatch")

MAX_FAILURES_REPORTED = 100  # failed attempts listed in report.json (the log has them all)
RESULT_TIMEOUT_S = 60.0  # fetching a finished task's small result; longer means its holder died
REBALANCE_TICK_S = 0.1  # the roles are re-decided at most this often (roles.py)


# Among the tasks ready on one worker, a decode (and its write) runs before a prefill, as a
# serving engine schedules its running requests before its waiting ones: its rows already have
# their first token out, and their TPOT counts every second they wait. A worker that took prefill
# units and is then called back to decode starts its decode after the prefill it is running,
# not after every unit it holds (a decode task only hands its packets to the engine: the next
# prefill starts at once).
PHASE_PRIORITY = {"decode": 1, "write": 1}


def submit_on(client: Client, worker: str, phase: str, key: str, fn, *args) -> Future:
    """A unit's task for `phase`, pinned to `worker`, at its phase's priority."""
    return client.submit(fn, *args, key=key, workers=[worker], allow_other_workers=False, pure=False,
                         priority=PHASE_PRIORITY.get(phase, 0))


class JobFailed(Exception):
    """The job cannot finish (exit code 1); the output directory stays resumable."""


# Why the scheduler removed a worker (the stimulus of its remove-worker event), in words.
DEPARTURES = {"handle-worker-cleanup": "its connection to the scheduler closed: the process died or closed",
              "check-worker-ttl": "no heartbeat within distributed.scheduler.worker-ttl"}


@dataclass
class _Unit:
    unit: WorkUnit
    keep: object  # pa.Table of --keep-columns, or None
    rows: object  # pa.Table the prefill reads
    attempt: int = 0
    phase: str = "prefill"
    prefill_worker: str | None = None
    counted_prefill: bool = False  # counts towards prefill_load of prefill_worker
    decode_worker: str | None = None
    kv_bytes: int = 0
    futures: dict = field(default_factory=dict)
    decode_started: float = 0.0
    work: int = 0  # decode work: the rows' max_new_tokens summed (what fair shares weigh)
    longest: int = 0  # the largest max_new_tokens of its rows (roles.py: the patience before a switch)
    waiting_since: float = 0.0  # prefilled, waiting for a decoder since (0: not waiting)
    prefill_started: float = 0.0
    probe: Suspect | None = None  # a single-row probe of a quarantine suspect (quarantine.py)


class Pipeline:
    def __init__(self, cfg: JobConfig, client: Client, plan: InputPlan, out: OutputDir,
                 done: dict[str, dict], protocol: str = "tcp", on_progress=None, unit_rows_source: str = "option"):
        self.cfg, self.client, self.plan, self.out = cfg, client, plan, out
        self.protocol = protocol
        self.done = done
        self.token = uuid.uuid4().hex[:8]
        self.columns = {"prompt": plan.prompt_column, "messages": plan.messages_column,
                        "sampling": plan.sampling_columns}
        self.defaults = cfg.default_params()
        self.totals, self.this_run = RunTotals(), RunTotals()
        for entry in done.values():
            self.totals.add(entry)
            for key in ("ttft_s", "tpot_s"):  # per-row lists, aggregated now: memory must not grow
                entry.pop(key, None)           # with the rows of a resumed job
        self.inflight: dict[str, _Unit] = {}
        self.prefill_load: dict[str, int] = {}
        self.decode_kv: dict[str, int] = {}  # KV bytes routed to each decode worker, not yet done
        self.decode_kv_peak: dict[str, int] = {}  # the most decode_kv held at once, for the report
        self.budgets: dict[str, int] = {}
        self.helpers: set[str] = set()  # workers whose engine prefills beside its decode (Roles.prefill_helpers)
        self.workers: dict[str, dict] = {}
        self.engine_rows: dict[str, int] = {}  # rows in each decode engine at its last heartbeat
        self.paced: set[str] = set()  # units that waited for decode slots before prefill (pacing.py)
        self.decode_rate = DecodeRate()
        self.decode_progress = DecodeProgress()  # decode work left per worker, for fair shares
        self.names: dict[str, str] = {}  # address -> worker name, kept after the worker left (logs)
        self.quarantine = Quarantine()
        self.retries = 0
        self.units_kept = 0  # units whose prefill worker left after their KV was pulled: not restarted
        self.failures: list[dict] = []  # failed attempts (unit, attempt, error) for report.json
        self.watchdog = Watchdog(client, cfg.stall_timeout)
        self.on_progress = on_progress or (lambda pipeline: None)
        self.started = time.time()
        self.unit_rows_source = unit_rows_source
        self.roles = Roles(rebalance=cfg.rebalance and cfg.mode == "disaggregated", started=self.started)
        self._last_tick = 0.0
        # bytes workers had already served (an existing cluster ran earlier jobs): not this run's
        self.sent_before = self._sent_bytes()

    # --- workers --------------------------------------------------------------------------
    def register_engines(self) -> None:
        from .cluster import worker_threads

        c = self.cfg
        # embedded workers get cores / workers torch threads; on a cluster someone else started,
        # torch keeps what the worker's environment (OMP_NUM_THREADS, --nthreads) gave it
        threads = c.threads_per_worker or (0 if c.existing_cluster
                                           else worker_threads(c, c.prefill_workers + c.decode_workers))
        plugin = EngineHost(model=os.path.abspath(c.model), dtype=c.dtype, device=c.device, mode=c.mode,
                            max_batch_tokens=c.max_batch_tokens, kv_budget_bytes=c.kv_budget_bytes(),
                            max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
                            threads=threads, engine=c.engine, rebalance=self.roles.rebalance,
                            enforce_eager=c.enforce_eager)
        self.client.register_plugin(plugin)

    def refresh_workers(self) -> None:
        info = scheduler_identity(self.client)["workers"]
        self.workers = {addr: {"name": str(w.get("name")), "resources": w.get("resources", {}),
                               "status": w.get("status")} for addr, w in info.items()}
        self.names.update({a: w["name"] for a, w in self.workers.items()})
        metrics = {a: (w.get("metrics") or {}).get("pdbatch") or {} for a, w in info.items()}
        self.engine_rows = {a: int(m.get("decode_active", 0)) + int(m.get("decode_waiting", 0))
                            for a, m in metrics.items() if "decode_active" in m}
        for a, m in metrics.items():
            if "decode_tokens" in m:
                self.decode_progress.heartbeat(a, int(m["decode_tokens"]))
        self.roles.sync(self.workers)
        new = [a for a in self.workers if a not in self.budgets]
        if new:
            # a worker may die between the two calls (that is what this driver survives), and a
            # new one may not have set its engines up yet: ask again on the next refresh
            status = self.client.run(worker_status, workers=new, on_error="return")
            for addr, s in status.items():
                if isinstance(s, dict) and s:
                    self.budgets[addr] = s.get("kv_budget_bytes", 0)
                    if s.get("prefills_beside_decode"):
                        self.helpers.add(addr)

    def live_workers(self) -> list[str]:
        return [a for a, w in self.workers.items() if w["status"] in (None, "running")]

    def role_workers(self, role: str) -> list[str]:
        """Live workers that take `role`'s units now (rebalancing: the driver's roles)."""
        if self.cfg.mode == "colocated":
            return self.live_workers()
        if self.roles.rebalance:
            return self.roles.pool(role, set(self.live_workers()))
        return self.resource_workers(role)

    def resource_workers(self, role: str) -> list[str]:
        """Live workers started with `role` as a resource."""
        return [a for a in self.live_workers() if self.workers[a]["resources"].get(role, 0) > 0]

    # --- submission -------------------------------------------------------------------------
    # Placement is strict (`workers=[w]`): the driver has already picked a worker of the right
    # role. If that worker leaves, the driver notices (refresh) and resubmits the unit; Dask's
    # loose restrictions combined with resources can land a task on a worker of the wrong role.
    def _key(self, phase: str, u: _Unit) -> str:
        return f"{phase}-{u.unit.unit_id}-{self.token}-{u.attempt}"

    def _submit(self, fn, *args, phase: str, u: _Unit, worker: str) -> Future:
        return submit_on(self.client, worker, phase, self._key(phase, u), fn, *args)

    def submit_unit(self, u: _Unit) -> bool:
        """Start a unit: prefill (disaggregated) or generate (colocated) on the least-busy worker."""
        colocated = self.cfg.mode == "colocated"
        pool = self.role_workers("decode" if colocated else "prefill")
        if self.roles.rebalance:  # the rest waits on the driver, for whichever worker takes prefill
            pool = [a for a in pool if self.prefill_load.get(a, 0) < PREFILL_DEPTH]
            if not pool and not colocated:  # every prefill worker holds its units
                pool = self.roles.prefill_helpers(self.prefill_load, self.helpers, set(self.live_workers()))
        if not pool or (not colocated and not self.roles.rebalance and not self._decode_room(u)):
            u.phase = "queued"
            return False
        w = min(pool, key=lambda a: (self.prefill_load.get(a, 0), a))
        if self.roles.role.get(w) == "decode" and not colocated:
            self.roles.units_lent += 1
        self.prefill_load[w] = self.prefill_load.get(w, 0) + 1
        u.prefill_worker, u.counted_prefill = w, True
        if colocated:
            u.phase, u.decode_worker = "decode", w
            u.futures = {"decode": self._submit(generate_unit, u.rows, self.columns, self.defaults,
                                                phase="generate", u=u, worker=w)}
            self._submit_write(u)
        else:
            u.phase, u.prefill_started = "prefill", time.time()
            u.futures = {"prefill": self._submit(prefill_unit, u.rows, self.columns, self.defaults,
                                                 phase="prefill", u=u, worker=w)}
        return True

    def _decode_room(self, u: _Unit) -> bool:
        """Fixed split: whether the decode workers have slots for u's rows (pacing.py)."""
        now = time.time()
        routed = self._decode_units(self.resource_workers("decode"))[1]
        slots = {a: DecodeSlots(n, 0, self.engine_rows.get(a)) for a, n in routed.items()}
        committed = 0
        for x in self.inflight.values():
            if x is not u and x.phase in ("prefill", "wait-room", "wait-decode"):
                committed += x.rows.num_rows
            elif x.phase == "decode" and x.decode_worker in slots and now - x.decode_started < HEARTBEAT_LAG_S:
                slots[x.decode_worker].recent_rows += x.rows.num_rows
        room = may_prefill(u.rows.num_rows, list(slots.values()), committed, self.cfg.max_num_seqs,
                           self.decode_rate.freed_during_prefill(now))
        if not room:
            self.paced.add(u.unit.unit_id)
        return room

    def submit_decode(self, u: _Unit) -> bool:
        """Route a prefilled unit to the decode worker with the most free KV budget."""
        pool = self.role_workers("decode")
        if not pool:
            u.phase = "wait-decode"
            u.waiting_since = u.waiting_since or time.time()
            return False
        pf = u.futures["prefill"]
        if u.phase != "wait-room":  # sized once; the unit may wait here for many loop turns
            try:
                u.kv_bytes = int(self.client.nbytes(keys=[pf.key], summary=False).get(pf.key, 0))
            except Exception:  # a missing size only weakens routing, never correctness
                u.kv_bytes = 0
        w = self._pick_decoder(u, pool) if self.roles.rebalance else self._pick_decoder_fixed(u, pool)
        if w is None:
            u.phase = "wait-room"
            u.waiting_since = u.waiting_since or time.time()
            return False
        self.decode_kv[w] = self.decode_kv.get(w, 0) + u.kv_bytes
        self.decode_kv_peak[w] = max(self.decode_kv_peak.get(w, 0), self.decode_kv[w])
        u.phase, u.decode_worker, u.decode_started, u.waiting_since = "decode", w, time.time(), 0.0
        u.futures["decode"] = self._submit(decode_unit, pf, pf.key, phase="decode", u=u, worker=w)
        self._submit_write(u)
        return True

    def _decode_units(self, pool) -> tuple[dict[str, int], dict[str, int], dict[str, int]]:
        """Units, rows and decode work routed to each worker of `pool` for decode, not yet written."""
        units, rows, work = {a: 0 for a in pool}, {a: 0 for a in pool}, {a: 0 for a in pool}
        for x in self.inflight.values():
            if x.phase == "decode" and x.decode_worker in units:
                units[x.decode_worker] += 1
                rows[x.decode_worker] += x.rows.num_rows
                work[x.decode_worker] += x.work
        return units, rows, work

    def _pick_decoder_fixed(self, u: _Unit, pool) -> str | None:
        # Packets wait in the decode worker's memory until its pool has room, outside the pool's
        # budget: cap them at one budget. A worker with fewer than two units always takes one
        # more, however large: the next unit's rows are there to fill the batch while the
        # current unit's last rows finish, and a small budget never stalls the job.
        units = self._decode_units(pool)[0]
        room = [a for a in pool if units[a] < 2
                or self.decode_kv.get(a, 0) + u.kv_bytes <= self.budgets.get(a, 0)]
        if not room:
            return None
        return max(room, key=lambda a: (self.budgets.get(a, 0) - self.decode_kv.get(a, 0), a))

    def _pick_decoder(self, u: _Unit, pool) -> str | None:
        """Rebalancing: the unit's own prefill worker if it decodes now (its KV is there), else
        the least-loaded decode worker, either below its fair share of the decode work (tokens left
        to generate by the rows decoding or waiting for a decoder, decode_progress.py, over every
        worker that could decode, or over the decoders while units wait for prefill: output
        lengths differ more than row counts), so that work stays on the driver for a worker
        that changes role. Within max_num_seqs and the KV budget; a
        worker with nothing to decode always takes a unit (a small budget never stalls the job)."""
        live = self.live_workers()  # pool is a subset: one count serves the shares and the picks
        units, rows, routed = self._decode_units(live)
        # what each worker has left to decode, not what was routed to it (decode_progress.py)
        work = {a: self.decode_progress.left(a, w) for a, w in routed.items()}
        stage = sum(work.values()) + sum(x.work for x in self.inflight.values()
                                         if x is u or x.phase in ("wait-room", "wait-decode"))
        # while units wait to be prefilled the prefill workers go on prefilling (roles.py moves
        # the last one never, the others only after a wait), so the decoders share the work
        # alone: with every worker counted, a lone decoder left half the prefilled units
        # waiting, first token out (summarize: short rows' TPOT 0.3 s, the job's p99)
        share = -(-stage // max(1, len(pool) if self._prefill_queued() else len(live)))
        n = u.rows.num_rows

        # below its share before this unit: when every worker decodes, some worker is, so no unit
        # waits (were the share checked after it, a unit longer than what is left of every share
        # waited for a whole unit to finish, then decoded alone: measured, 28 s for 4 rows)
        def fits(a, cap):
            return not units[a] or (work[a] < cap and rows[a] + n <= self.cfg.max_num_seqs
                                    and self.decode_kv.get(a, 0) + u.kv_bytes <= self.budgets.get(a, 0))

        if u.prefill_worker in pool and fits(u.prefill_worker, share):
            return u.prefill_worker
        room = [a for a in pool if fits(a, share)]
        if room and self._decodes_own_units_soon(u.prefill_worker):
            room = [a for a in room if not units[a]]  # a worker with nothing to decode still takes it
        if not room:
            return None
        return min(room, key=lambda a: (work[a], self.decode_kv.get(a, 0) - self.budgets.get(a, 0),
                                        self.names.get(a, a)))

    def _decodes_own_units_soon(self, holder: str | None) -> bool:
        """Whether the prefill worker holding a unit's KV runs out of prefill with the unit it is
        running: nothing waits to be prefilled, so it then becomes a decoder and decodes the
        units it holds where their KV is (roles.py). Another decoder that already has work then
        leaves them there: measured at 60 rows, the worker that ran out of prefill 50 ms before
        the other took the other's units and the other took its, and 69 % of the job's KV
        crossed between them for nothing."""
        if not self.roles.rebalance or holder not in self.workers or self.roles.role.get(holder) != "prefill":
            return False
        if self.prefill_load.get(holder, 0) > 1:
            return False
        return not self._prefill_queued()

    def _prefill_queued(self) -> bool:
        """Whether a unit in the window waits for a prefill worker."""
        return any(x.phase == "queued" for x in self.inflight.values())

    def _rebalance(self) -> None:
        """Move workers between the roles (roles.py), at most every 0.1 s."""
        now = time.time()
        if not self.roles.rebalance or now - self._last_tick < REBALANCE_TICK_S:
            return
        self._last_tick = now
        live = set(self.live_workers())
        rows = self._decode_units(live)[1]
        held: dict[str, int] = {}
        queued = waiting = longest = 0
        oldest = now
        for x in self.inflight.values():
            longest = max(longest, x.longest)
            if x.phase == "queued":
                queued += 1
            elif x.phase in ("wait-room", "wait-decode"):
                waiting += 1
                oldest = min(oldest, x.waiting_since or now)
                held[x.prefill_worker] = held.get(x.prefill_worker, 0) + 1
        self.roles.rebalance_tick(View(prefill_units=dict(self.prefill_load), decode_rows=rows, held=held,
                                       queued_prefill=queued, waiting_decode=waiting,
                                       oldest_wait_s=now - oldest, unit_tokens=longest), live, now)

    def _submit_write(self, u: _Unit) -> None:
        if u.probe is not None:  # a probe's one row comes back to the driver (quarantine.py)
            return
        # on the decode worker, where the outputs already are
        u.futures["write"] = self._submit(write_unit, u.futures["decode"], u.keep,
                                          os.path.abspath(self.out.path), u.unit.unit_id,
                                          phase="write", u=u, worker=u.decode_worker)

    def _release(self, u: _Unit) -> None:
        self._end_prefill_load(u)
        if u.decode_worker and u.kv_bytes:
            self.decode_kv[u.decode_worker] = max(0, self.decode_kv.get(u.decode_worker, 0) - u.kv_bytes)
        for f in u.futures.values():
            f.release()
        u.futures, u.kv_bytes, u.prefill_worker, u.decode_worker = {}, 0, None, None
        u.waiting_since = 0.0

    def _end_prefill_load(self, u: _Unit) -> None:
        if u.counted_prefill and u.prefill_worker:
            self.prefill_load[u.prefill_worker] = max(0, self.prefill_load.get(u.prefill_worker, 0) - 1)
        u.counted_prefill = False

    def _retry(self, u: _Unit, why: str) -> None:
        """Start the unit over from its prompts (new keys), at most --max-attempts times in all;
        then its rows go to quarantine (quarantine.py). Nothing of a failed attempt is written:
        its write task is released with it, and only the driver appends to the manifest."""
        self._release(u)
        self.watchdog.progress()  # the unit starts a fresh wait
        if len(self.failures) < MAX_FAILURES_REPORTED:
            self.failures.append({"unit": u.unit.unit_id, "attempt": u.attempt + 1, "error": why})
        u.attempt += 1
        self.retries += 1
        if u.probe is not None:  # a row that failed alone on the cluster: quarantined
            del self.inflight[u.unit.unit_id]
            self.quarantine.failed(u.probe, u.rows.column(ROW_ID)[0].as_py(), why)
            if u.probe.systematic:
                raise JobFailed(f"the first {len(u.probe.outputs)} rows of unit {u.probe.unit.unit.unit_id} "
                                f"also failed one at a time, alone on the cluster: not a bad row but a "
                                f"broken setup; last error: {why}")
            return
        if u.attempt >= self.cfg.max_attempts:
            del self.inflight[u.unit.unit_id]
            self.quarantine.add(u, u.attempt, why)
            return
        log.warning("unit %s: %s; starting it again (attempt %d/%d)", u.unit.unit_id, why,
                    u.attempt + 1, self.cfg.max_attempts)
        self.submit_unit(u)

    def _next_probe(self) -> None:
        """With nothing else in flight: start the next single-row probe, or write a suspect
        unit whose rows have all been probed."""
        nxt = self.quarantine.next_probe()
        if nxt is None:
            s = self.quarantine.pop()
            table = outputs_to_table(s.outputs, s.unit.keep)
            write_shard(self.out.path, s.unit.unit.unit_id, table)  # OUT is shared on multi-node runs
            self._record(unit_summary(s.unit.unit.unit_id, s.outputs, "driver"))
            return
        suspect, wu, rows = nxt
        probe = _Unit(unit=wu, keep=None, rows=rows, probe=suspect, **self._decode_lengths(rows))
        self.inflight[wu.unit_id] = probe
        self.submit_unit(probe)

    def _record(self, summary: dict) -> None:
        self.out.record(summary)
        self.totals.add(summary)
        self.this_run.add(summary)

    # --- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        todo = iter([u for u in self.plan.units if u.unit_id not in self.done])
        self.out.remove_strays(set(self.done))
        self.out.clear_success()
        self.refresh_workers()
        last_refresh = time.time()
        window = self.cfg.inflight_units(self.cfg.unit_rows, len(self.workers) or None)
        self.roles.started = self.started
        stalled_since: float | None = None
        exhausted = False
        while True:
            if time.time() - last_refresh > 0.5:
                self.refresh_workers()
                last_refresh = time.time()
                self._recover_lost_workers()
            # a quarantine suspect's rows run alone (quarantine.py): admit nothing while it waits
            while not exhausted and len(self.inflight) < window and not self.quarantine.active:
                unit = next(todo, None)
                if unit is None:
                    exhausted = True
                    break
                u = self._make_unit(unit)
                self.inflight[unit.unit_id] = u
                self.submit_unit(u)
            if self.quarantine.active and not self.inflight:
                self._next_probe()
                continue
            if exhausted and not self.inflight:
                break
            self._rebalance()
            waiting = []
            for u in list(self.inflight.values()):
                if u.phase == "queued":
                    self.submit_unit(u)
                elif u.phase in ("wait-decode", "wait-room"):
                    waiting.append(u)
            # units whose KV is on a worker that decodes now go first, each to that worker (its
            # fair share allows): a worker that just switched to decode takes its own units, not
            # those of a worker about to switch too (measured: two units crossed each way, KV
            # moved for nothing, when both workers ran out of prefill within 50 ms)
            decoding = set(self.role_workers("decode"))
            for u in sorted(waiting, key=lambda u: u.prefill_worker not in decoding):
                self.submit_decode(u)
            stalled_since = self._check_stall(stalled_since)
            for u, why in self.watchdog.check(self.inflight):  # watchdog.py: stuck, not slow
                if self.inflight.get(u.unit.unit_id) is u:
                    self._retry(u, why)
            # only pending futures: a finished prefill stays in u.futures (its KV feeds decode),
            # and waiting on it would return at once and spin this loop
            futures = [f for u in self.inflight.values() for f in u.futures.values() if not f.done()]
            # while units wait for a worker, the next roles tick must not wait for a task to end:
            # a prefill worker that ran out of prefill became a decoder up to 0.5 s late
            waits = self.roles.rebalance and any(u.phase in ("queued", "wait-decode", "wait-room")
                                                 for u in self.inflight.values())
            if futures:
                try:
                    wait(futures, timeout=REBALANCE_TICK_S if waits else 0.5, return_when="FIRST_COMPLETED")
                except TimeoutError:  # nothing finished within 0.5 s: loop to refresh workers
                    pass
            else:
                time.sleep(0.2)
            for u in list(self.inflight.values()):
                self._advance(u)
            self.on_progress(self)
        return self.finish()

    def _check_stall(self, since: float | None) -> float | None:
        waiting = [u.phase for u in self.inflight.values() if u.phase in ("queued", "wait-decode")]
        if self.role_workers("prefill"):  # queued units may be paced (pacing.py), not stalled
            waiting = [p for p in waiting if p != "queued"]
        if self.roles.rebalance and self.roles.pool("prefill", set(self.live_workers())) \
                + self.roles.pool("decode", set(self.live_workers())):
            waiting = []  # some worker can take either role: rebalancing gives it the work
        if not waiting:
            return None
        since = since or time.time()
        if time.time() - since > self.cfg.worker_timeout:
            role = "decode" if "wait-decode" in waiting else "prefill"
            raise JobFailed(f"no {role} worker available for {self.cfg.worker_timeout:g}s "
                            f"(--worker-timeout); {self.totals.rows}/{self.plan.total_rows} rows are written; "
                            f"start workers and rerun the same command to resume")
        return since

    def _recover_lost_workers(self) -> None:
        """A unit whose results sit on (or whose task is placed on) a departed worker restarts,
        except one whose prefill worker left after a live decode worker pulled the unit's KV:
        Dask keeps that copy, and the decode goes on (restarting it would prefill and decode
        the unit again)."""
        reasons: dict[str, str] = {}
        for u in list(self.inflight.values()):
            gone = [w for w in (u.prefill_worker, u.decode_worker) if w and w not in self.workers]
            if not gone or not u.futures or (u.futures.get("write") and u.futures["write"].done()):
                continue
            w = gone[0]
            if w not in reasons:
                reasons[w] = self._departure(w)
            if gone == [u.prefill_worker] and self._kv_pulled(u):
                log.warning("unit %s: prefill worker %s (%s) left%s; its decode worker had pulled the "
                            "unit's KV, so the decode goes on", u.unit.unit_id, self.names.get(w, "?"), w,
                            reasons[w])
                u.prefill_worker = None  # nothing of the unit is left on it
                self.units_kept += 1
                continue
            self._retry(u, f"worker {self.names.get(w, '?')} ({w}) left{reasons[w]}")

    def _kv_pulled(self, u: _Unit) -> bool:
        """Whether a live worker other than the departed prefill worker holds the unit's KV
        (its decode worker fetched it), so the decode task needs nothing that was lost."""
        pf = u.futures.get("prefill")
        if u.phase != "decode" or pf is None or u.decode_worker not in self.workers:
            return False
        try:
            holders = self.client.who_has([pf]).get(pf.key, ())
        except Exception:  # an unanswered question is a lost unit: restart it, as before
            return False
        return any(h in self.workers for h in holders)

    def _departure(self, addr: str) -> str:
        """Why the scheduler removed a worker, from its events (for the log line and report)."""
        try:
            events = self.client.get_events(addr)
        except Exception:
            return ""
        removed = [m for _, m in events if isinstance(m, dict) and m.get("action") == "remove-worker"]
        if not removed:
            return ""
        stimulus = str(removed[-1].get("stimulus_id", "")).rstrip("0123456789.").rstrip("-")
        return f" ({DEPARTURES.get(stimulus, stimulus)})" if stimulus else ""

    def _make_unit(self, unit: WorkUnit) -> _Unit:
        table = read_unit(self.plan, unit)
        keep = table.select(self.plan.keep_columns) if self.plan.keep_columns else None
        needed = [c for c in (self.plan.prompt_column, self.plan.messages_column,
                              *self.plan.sampling_columns, ROW_ID) if c]
        return _Unit(unit=unit, keep=keep, rows=table.select(needed), **self._decode_lengths(table))

    def _decode_lengths(self, table) -> dict:
        """The unit's decode work for fair shares (its rows' max_new_tokens summed, column or
        default) and its longest row's (the roles' patience)."""
        default = self.cfg.max_new_tokens
        if "max_new_tokens" not in self.plan.sampling_columns:
            return {"work": table.num_rows * default, "longest": default if table.num_rows else 0}
        lengths = []
        for v in table.column("max_new_tokens").to_pylist():
            try:
                lengths.append(default if v is None or v != v else max(1, min(int(v), 1 << 20)))
            except (TypeError, ValueError, OverflowError):
                lengths.append(default)  # a bad value is that row's error, found on the worker
        return {"work": sum(lengths), "longest": max(lengths, default=0)}

    def _advance(self, u: _Unit) -> None:
        failed = [f for f in u.futures.values() if f.status in ("error", "cancelled")]
        if failed:
            f = failed[0]
            self._retry(u, f"task failed: {f.exception() if f.status == 'error' else 'cancelled'}")
        elif u.phase == "prefill" and u.futures["prefill"].status == "finished":
            self.watchdog.progress()
            self._end_prefill_load(u)
            self.decode_rate.unit_prefilled(time.time() - u.prefill_started)
            self.submit_decode(u)
        elif u.probe is not None and "decode" in u.futures and u.futures["decode"].status == "finished":
            out = self._result(u, "decode")
            if out is not None:
                self.watchdog.progress()
                self._release(u)
                del self.inflight[u.unit.unit_id]
                self.quarantine.passed(u.probe, out[0])
        elif "write" in u.futures and u.futures["write"].status == "finished":
            summary = self._result(u, "write")
            if summary is not None:
                self.watchdog.progress()
                self.roles.unit_decoded(time.time() - u.decode_started)
                self.decode_rate.unit_written(u.rows.num_rows, time.time())
                self.decode_progress.unit_written(u.decode_worker, summary)
                self._record(summary)
                self._release(u)
                del self.inflight[u.unit.unit_id]

    def _result(self, u: _Unit, phase: str):
        """A finished task's (small) result; None after restarting the unit if its holder died
        in between (Dask would otherwise wait for a recompute pinned to the dead worker)."""
        try:
            return u.futures[phase].result(timeout=RESULT_TIMEOUT_S)
        except Exception as e:
            self._retry(u, f"result of {phase} lost: {type(e).__name__}: {e}")
            return None

    def finish(self) -> dict:
        wall = time.time() - self.started
        self.refresh_workers()
        moved = {a: v - self.sent_before.get(a, 0) for a, v in self._sent_bytes().items()}
        # the split the workers were started with (the driver's roles: report["roles"])
        workers = {"prefill": len(self.resource_workers("prefill")), "decode": len(self.resource_workers("decode"))}
        if self.cfg.mode == "colocated":
            workers = {"colocated": len(self.role_workers("decode"))}
        report = build_report(self.totals, this_run=self.this_run, wall_s=wall, mode=self.cfg.mode,
                              workers=workers, dashboard=self.client.dashboard_link,
                              total_rows=self.plan.total_rows, resumed_units=len(self.done),
                              dask_transfer_bytes=int(sum(moved.values())), protocol=self.protocol)
        report["unit_retries"] = self.retries
        report["units_kept_after_prefill_worker_left"] = self.units_kept
        report["rows_quarantined"] = self.quarantine.rows_quarantined
        report["unit_failures"] = self.failures
        report["stall_bound_s"] = round(self.watchdog.bound(), 1)
        report["worker_memory"] = self._worker_memory()
        report["unit_rows"] = self.cfg.unit_rows
        report["unit_rows_source"] = self.unit_rows_source
        report["units_paced"] = len(self.paced)
        if self.cfg.mode == "disaggregated":
            report["roles"] = self.roles.report()
            report["role_switches"] = self.roles.switches
        self.out.write_report(report)
        if self.totals.rows == self.plan.total_rows:
            self.out.mark_success()
        return report

    def _sent_bytes(self) -> dict[str, int]:
        return {a: v for a, v in self.client.run(sent_transfer_bytes, on_error="return").items()
                if isinstance(v, int)}

    def _worker_memory(self) -> dict:
        """Per live worker (by name): peak RSS, the decode KV pool's peak against its budget, and
        the most packet KV the driver had routed to it at once (kv_routed_peak_bytes)."""
        got = self.client.run(worker_memory, on_error="return")
        out = {v.pop("name"): v for v in got.values() if isinstance(v, dict) and v}
        for addr, peak in self.decode_kv_peak.items():  # the driver's side: packets routed, not done
            if self.names.get(addr) in out:
                out[self.names[addr]]["kv_routed_peak_bytes"] = peak
        return out
