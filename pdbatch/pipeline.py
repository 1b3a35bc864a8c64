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
    def _key(self, phase: str, u: _Unit) -> str:
        return f"{phase}-{u.unit.unit_id}-{self.token}-{u.attempt}"

    def submit_unit(self, u: _Unit) -> bool:
        if self.cfg.mode == "colocated":
            pool = self.role_workers("decode")
            if not pool:
                return False
            w = min(pool, key=lambda a: (self.prefill_load.get(a, 0), a))
            fut = self.client.submit(generate_unit, u.rows, self.columns, self.defaults,
                                     key=self._key("generate", u), workers=[w], allow_other_workers=True,
                                     pure=False)
            u.phase, u.decode_worker = "decode", w
            self.prefill_load[w] = self.prefill_load.get(w, 0) + 1
            u.futures = {"decode": fut}
            self._submit_write(u, fut, w)
            return True
        pool = self.role_workers("prefill")
        if not pool:
            return False
        w = min(pool, key=lambda a: (self.prefill_load.get(a, 0), a))
        self.prefill_load[w] = self.prefill_load.get(w, 0) + 1
        u.phase, u.prefill_worker = "prefill", w
        u.futures = {"prefill": self.client.submit(
            prefill_unit, u.rows, self.columns, self.defaults, key=self._key("prefill", u),
            workers=[w], allow_other_workers=True, resources={"prefill": 1}, pure=False)}
        return True

    def submit_decode(self, u: _Unit) -> bool:
        pool = self.role_workers("decode")
        if not pool:
            return False
        pf = u.futures["prefill"]
        try:
            u.kv_bytes = int(self.client.nbytes(keys=[pf.key], summary=False).get(pf.key, 0))
        except Exception:
            u.kv_bytes = 0
        w = max(pool, key=lambda a: (self.budgets.get(a, 0) - self.decode_kv.get(a, 0), a))
        self.decode_kv[w] = self.decode_kv.get(w, 0) + u.kv_bytes
        u.phase, u.decode_worker = "decode", w
        fut = self.client.submit(decode_unit, pf, pf.key, key=self._key("decode", u), workers=[w],
                                 allow_other_workers=True, resources={"decode": 1}, pure=False)
        u.futures["decode"] = fut
        self._submit_write(u, fut, w)
        return True

    def _submit_write(self, u: _Unit, decode_fut: Future, w: str) -> None:
        u.futures["write"] = self.client.submit(
            write_unit, decode_fut, u.keep, os.path.abspath(self.out.path), u.unit.unit_id,
            key=self._key("write", u), workers=[w], allow_other_workers=True, pure=False)

    def _release(self, u: _Unit) -> None:
        if u.prefill_worker:
            self.prefill_load[u.prefill_worker] = max(0, self.prefill_load.get(u.prefill_worker, 0) - 1)
        if self.cfg.mode == "colocated" and u.decode_worker:
            self.prefill_load[u.decode_worker] = max(0, self.prefill_load.get(u.decode_worker, 0) - 1)
        if u.decode_worker and u.kv_bytes:
            self.decode_kv[u.decode_worker] = max(0, self.decode_kv.get(u.decode_worker, 0) - u.kv_bytes)
        for f in u.futures.values():
            f.release()
        u.futures = {}

    # --- main loop --------------------------------------------------------------------------
    def run(self) -> dict:
        todo = [u for u in self.plan.units if u.unit_id not in self.done]
        self.out.remove_strays(set(self.done))
        self.out.clear_success()
        window = self.cfg.inflight_units()
        waiting: list[_Unit] = []  # prefilled units waiting for a decode worker
        last_refresh = 0.0
        no_worker_since: float | None = None
        it = iter(todo)
        exhausted = not todo
        while not exhausted or self.inflight:
            if time.time() - last_refresh > 0.5:
                self.refresh_workers()
                last_refresh = time.time()
            # fill the window
            while not exhausted and len(self.inflight) < window:
                unit = next(it, None)
                if unit is None:
                    exhausted = True
                    break
                u = self._make_unit(unit)
                self.inflight[unit.unit_id] = u
                if not self.submit_unit(u):
                    u.phase = "queued"
            for u in [u for u in self.inflight.values() if u.phase == "queued"]:
                self.submit_unit(u)
            for u in list(waiting):
                if self.submit_decode(u):
                    waiting.remove(u)
            stalled = any(u.phase == "queued" for u in self.inflight.values()) or bool(waiting)
            if stalled:
                no_worker_since = no_worker_since or time.time()
                if time.time() - no_worker_since > NO_WORKER_TIMEOUT_S:
                    raise JobFailed(f"no {'decode' if waiting else 'prefill'} worker available for "
                                    f"{NO_WORKER_TIMEOUT_S:.0f}s; rerun the same command to resume")
            else:
                no_worker_since = None
            futures = [f for u in self.inflight.values() for f in u.futures.values()]
            if futures:
                wait(futures, timeout=0.5, return_when="FIRST_COMPLETED")
            else:
                time.sleep(0.2)
            for u in list(self.inflight.values()):
                self._advance(u, waiting)
            self.on_progress(self)
        return self.finish()

    def _make_unit(self, unit: WorkUnit) -> _Unit:
        table = read_unit(self.plan, unit)
        keep = table.select(self.plan.keep_columns) if self.plan.keep_columns else None
        needed = [c for c in (self.plan.prompt_column, self.plan.messages_column,
                              *self.plan.sampling_columns, ROW_ID) if c]
        return _Unit(unit=unit, keep=keep, rows=table.select(needed))

    def _advance(self, u: _Unit, waiting: list) -> None:
        failed = [f for f in u.futures.values() if f.status in ("error", "cancelled")]
        if failed:
            err = failed[0].exception() if failed[0].status == "error" else "cancelled"
            self._release(u)
            u.attempt += 1
            if u.attempt >= MAX_ATTEMPTS:
                raise JobFailed(f"unit {u.unit.unit_id} failed {MAX_ATTEMPTS} times: {err}")
            log.warning("unit %s failed (%s); retrying (attempt %d/%d)", u.unit.unit_id, err,
                        u.attempt + 1, MAX_ATTEMPTS)
            if u in waiting:
                waiting.remove(u)
            if not self.submit_unit(u):
                u.phase = "queued"
            return
        if u.phase == "prefill" and u.futures["prefill"].status == "finished":
            if self.prefill_load.get(u.prefill_worker):
                self.prefill_load[u.prefill_worker] -= 1
            u.prefill_worker = None  # released for routing purposes
            if not self.submit_decode(u):
                u.phase = "wait-decode"
                waiting.append(u)
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
