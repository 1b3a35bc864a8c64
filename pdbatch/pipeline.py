"""The driver: feeds work units through prefill and decode workers and writes the results.

Scheduling decisions live here, on the client, because tasks with resource restrictions are
never queued by the Dask scheduler (everything submitted is handed to workers at once):
- a window of at most `max_inflight_units` units is in flight, so KV in memory stays bounded
  however large the input is;
- a unit's prefill goes to the prefill worker with the fewest units in progress;
- when its prefill finishes, its decode goes to the decode worker with the most free KV budget
  (its budget minus the KV already routed to it and not yet decoded);
- the worker list is re-read continuously, so workers that join mid-job take work and workers
  that leave are no longer chosen (Dask recomputes what they held from lineage).
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass, field

from distributed import Client, Future, wait

from .config import JobConfig
from .dataset import ROW_ID, InputPlan, WorkUnit, read_unit
from .output import OutputDir
from .report import RunTotals, build_report
from .tasks import decode_unit, generate_unit, prefill_unit, write_unit
from .worker import EngineHost, incoming_transfer_bytes, worker_status

log = logging.getLogger("pdbatch")

MAX_ATTEMPTS = 3
NO_WORKER_TIMEOUT_S = 300.0


class JobFailed(Exception):
    """The job cannot finish (exit code 1); the output directory stays resumable."""


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


class Pipeline:
    def __init__(self, cfg: JobConfig, client: Client, plan: InputPlan, out: OutputDir,
                 done: dict[str, dict], protocol: str = "tcp", on_progress=None):
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
        self.inflight: dict[str, _Unit] = {}
        self.prefill_load: dict[str, int] = {}
        self.decode_kv: dict[str, int] = {}  # KV bytes routed to each decode worker, not yet done
        self.budgets: dict[str, int] = {}
        self.workers: dict[str, dict] = {}
        self.on_progress = on_progress or (lambda pipeline: None)
        self.started = time.time()

    # --- workers --------------------------------------------------------------------------
    def register_engines(self) -> None:
        c = self.cfg
        total = c.prefill_workers + c.decode_workers
        from .cluster import worker_threads

        plugin = EngineHost(model=os.path.abspath(c.model), dtype=c.dtype, device=c.device, mode=c.mode,
                            max_batch_tokens=c.max_batch_tokens, kv_budget_bytes=c.kv_budget_bytes(),
                            max_num_seqs=c.max_num_seqs, max_model_len=c.max_model_len,
                            threads=c.threads_per_worker or (worker_threads(c, total)
                                                             if not (c.scheduler_address or c.scheduler_file) else 0))
        self.client.register_plugin(plugin)

    def refresh_workers(self) -> None:
        info = self.client.scheduler_info(n_workers=-1)["workers"]
        self.workers = {addr: {"name": str(w.get("name")), "resources": w.get("resources", {}),
                               "status": w.get("status")} for addr, w in info.items()}
        new = [a for a in self.workers if a not in self.budgets]
        if new:
            status = self.client.run(worker_status, workers=new)
            for addr, s in status.items():
                self.budgets[addr] = s.get("kv_budget_bytes", 0) if s else 0

    def role_workers(self, role: str) -> list[str]:
        if self.cfg.mode == "colocated":
            return [a for a in self.workers if self.workers[a]["status"] in (None, "running")]
        return [a for a, w in self.workers.items() if w["resources"].get(role, 0) > 0
                and w["status"] in (None, "running")]

    # --- submission -------------------------------------------------------------------------
    # Placement is strict (`workers=[w]`): the driver has already picked a worker of the right
    # role. If that worker leaves, the driver notices (refresh) and resubmits the unit; Dask's
    # loose restrictions combined with resources can land a task on a worker of the wrong role.
    def _key(self, phase: str, u: _Unit) -> str:
        return f"{phase}-{u.unit.unit_id}-{self.token}-{u.attempt}"

    def _submit(self, fn, *args, phase: str, u: _Unit, worker: str) -> Future:
        return self.client.submit(fn, *args, key=self._key(phase, u), workers=[worker],
                                  allow_other_workers=False, pure=False)

    def submit_unit(self, u: _Unit) -> bool:
        """Start a unit: prefill (disaggregated) or generate (colocated) on the least-busy worker."""
        colocated = self.cfg.mode == "colocated"
        pool = self.role_workers("decode" if colocated else "prefill")
        if not pool:
            u.phase = "queued"
            return False
        w = min(pool, key=lambda a: (self.prefill_load.get(a, 0), a))
        self.prefill_load[w] = self.prefill_load.get(w, 0) + 1
        u.prefill_worker, u.counted_prefill = w, True
        if colocated:
            u.phase, u.decode_worker = "decode", w
            u.futures = {"decode": self._submit(generate_unit, u.rows, self.columns, self.defaults,
                                                phase="generate", u=u, worker=w)}
            self._submit_write(u)
        else:
            u.phase = "prefill"
            u.futures = {"prefill": self._submit(prefill_unit, u.rows, self.columns, self.defaults,
                                                 phase="prefill", u=u, worker=w)}
        return True

    def submit_decode(self, u: _Unit) -> bool:
        """Route a prefilled unit to the decode worker with the most free KV budget."""
        pool = self.role_workers("decode")
        if not pool:
            u.phase = "wait-decode"
            return False
        pf = u.futures["prefill"]
        try:
            u.kv_bytes = int(self.client.nbytes(keys=[pf.key], summary=False).get(pf.key, 0))
        except Exception:  # a missing size only weakens routing, never correctness
            u.kv_bytes = 0
        w = max(pool, key=lambda a: (self.budgets.get(a, 0) - self.decode_kv.get(a, 0), a))
        self.decode_kv[w] = self.decode_kv.get(w, 0) + u.kv_bytes
        u.phase, u.decode_worker = "decode", w
        u.futures["decode"] = self._submit(decode_unit, pf, pf.key, phase="decode", u=u, worker=w)
        self._submit_write(u)
        return True

    def _submit_write(self, u: _Unit) -> None:
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

    def _end_prefill_load(self, u: _Unit) -> None:
        if u.counted_prefill and u.prefill_worker:
            self.prefill_load[u.prefill_worker] = max(0, self.prefill_load.get(u.prefill_worker, 0) - 1)
        u.counted_prefill = False

    def _retry(self, u: _Unit, why: str) -> None:
        """Start the unit over from its prompts (new keys), at most MAX_ATTEMPTS times."""
        self._release(u)
        u.attempt += 1
        if u.attempt >= MAX_ATTEMPTS:
            raise JobFailed(f"unit {u.unit.unit_id} failed {MAX_ATTEMPTS} times, last: {why}")
        log.warning("unit %s: %s; starting it again (attempt %d/%d)", u.unit.unit_id, why,
                    u.attempt + 1, MAX_ATTEMPTS)
        self.submit_unit(u)

    # --- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        todo = iter([u for u in self.plan.units if u.unit_id not in self.done])
        self.out.remove_strays(set(self.done))
        self.out.clear_success()
        window = self.cfg.inflight_units()
        last_refresh = 0.0
        stalled_since: float | None = None
        exhausted = False
        while True:
            if time.time() - last_refresh > 0.5:
                self.refresh_workers()
                last_refresh = time.time()
                self._recover_lost_workers()
            while not exhausted and len(self.inflight) < window:  # fill the window
                unit = next(todo, None)
                if unit is None:
                    exhausted = True
                    break
                u = self._make_unit(unit)
                self.inflight[unit.unit_id] = u
                self.submit_unit(u)
            if exhausted and not self.inflight:
                break
            for u in list(self.inflight.values()):
                if u.phase == "queued":
                    self.submit_unit(u)
                elif u.phase == "wait-decode":
                    self.submit_decode(u)
            stalled_since = self._check_stall(stalled_since)
            futures = [f for u in self.inflight.values() for f in u.futures.values()]
            if futures:
                try:
                    wait(futures, timeout=0.5, return_when="FIRST_COMPLETED")
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
        if not waiting:
            return None
        since = since or time.time()
        if time.time() - since > NO_WORKER_TIMEOUT_S:
            role = "decode" if "wait-decode" in waiting else "prefill"
            raise JobFailed(f"no {role} worker available for {NO_WORKER_TIMEOUT_S:.0f}s; "
                            f"rerun the same command to resume")
        return since

    def _recover_lost_workers(self) -> None:
        """A unit whose results sit on (or whose task is placed on) a departed worker restarts."""
        for u in list(self.inflight.values()):
            gone = [w for w in (u.prefill_worker, u.decode_worker) if w and w not in self.workers]
            if gone and u.futures and not (u.futures.get("write") and u.futures["write"].done()):
                self._retry(u, f"worker {gone[0]} left")

    def _make_unit(self, unit: WorkUnit) -> _Unit:
        table = read_unit(self.plan, unit)
        keep = table.select(self.plan.keep_columns) if self.plan.keep_columns else None
        needed = [c for c in (self.plan.prompt_column, self.plan.messages_column,
                              *self.plan.sampling_columns, ROW_ID) if c]
        return _Unit(unit=unit, keep=keep, rows=table.select(needed))

    def _advance(self, u: _Unit) -> None:
        failed = [f for f in u.futures.values() if f.status in ("error", "cancelled")]
        if failed:
            f = failed[0]
            self._retry(u, f"task failed: {f.exception() if f.status == 'error' else 'cancelled'}")
        elif u.phase == "prefill" and u.futures["prefill"].status == "finished":
            self._end_prefill_load(u)
            self.submit_decode(u)
        elif "write" in u.futures and u.futures["write"].status == "finished":
            summary = u.futures["write"].result()
            self.out.record(summary)
            self.totals.add(summary)
            self.this_run.add(summary)
            self._release(u)
            del self.inflight[u.unit.unit_id]

    def finish(self) -> dict:
        wall = time.time() - self.started
        self.refresh_workers()
        moved = self.client.run(incoming_transfer_bytes)
        workers = {"prefill": len(self.role_workers("prefill")), "decode": len(self.role_workers("decode"))}
        if self.cfg.mode == "colocated":
            workers = {"colocated": len(self.role_workers("decode"))}
        report = build_report(self.totals, this_run=self.this_run, wall_s=wall, mode=self.cfg.mode,
                              workers=workers, dashboard=self.client.dashboard_link,
                              total_rows=self.plan.total_rows, resumed_units=len(self.done),
                              dask_transfer_bytes=int(sum(moved.values())), protocol=self.protocol)
        self.out.write_report(report)
        if self.totals.rows == self.plan.total_rows:
            self.out.mark_success()
        return report
