"""The systems `pdbatch bench` compares, each run on the same workload and timed the same way.

Every system starts with the model loaded and warmed up (a few short rows first), so the clock
measures generation only: from the moment all rows are handed over to the moment the last row
is done. TTFT counts from that same moment (offline batch: every row is available at the start),
TPOT is (last token time - first token time) / (tokens - 1) of each row.

- disaggregated / colocated: real pdbatch runs (`Pipeline`) on an embedded Dask cluster of
  separate worker processes, output written as Parquet. A row's first-token time is its
  unit's task start (from the task stream) plus the row's own `ttft_s`.
- hf_generate / generate_batch: the engine benchmark's baselines (pdbatch.bench.engine), run
  in this process with torch threads = all the cores the pdbatch workers share. They are
  timed from the outside: a forward hook stamps every forward pass of `model.generate` (static
  batches: a row's first token is its batch's prefill end, its k-th token the k-th forward),
  and transformers' continuous batching records per-token timestamps (`record_timestamps`).
"""

from __future__ import annotations

import os
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from pdbatch.bench.workloads import ID_COLUMN, PROMPT_COLUMN
from pdbatch.errors import UserError

PDBATCH_SYSTEMS = ("disaggregated", "colocated")
# vllm: vLLM's own LLM.generate in a child process (bench/vllm_baseline.py); needs vLLM installed
BASELINES = ("hf_generate", "generate_batch", "vllm")
SYSTEMS = PDBATCH_SYSTEMS + BASELINES
PHASES = ("prefill", "decode", "generate", "write")


@dataclass
class SystemRun:
    outputs: list  # generated token ids per row, workload order
    wall_s: float
    ttft_s: list  # per row, from the start of the run
    tpot_s: list  # per row with >= 2 tokens
    cpu_s: float | None = None
    extra: dict = field(default_factory=dict)


def _tpot(first: float, last: float, n: int) -> float | None:
    return (last - first) / (n - 1) if n > 1 else None


# --- pdbatch on a real embedded cluster -------------------------------------------------------

def run_pdbatch(cfg, input_path: str, warmup_path: str, out_dir: str, echo=print) -> SystemRun:
    """One pdbatch run: start the cluster, load the engines, warm up, then the timed run."""
    from distributed import get_task_stream

    from pdbatch.driver.cluster import connect, scheduler_identity
    from pdbatch.driver.pipeline import Pipeline
    from pdbatch.driver.worker import worker_status
    from pdbatch.io.dataset import plan_input
    from pdbatch.io.output import OutputDir

    def pipeline(client, protocol, path, out, unit_rows):
        plan = plan_input(path, prompt_column=PROMPT_COLUMN, id_column=ID_COLUMN, unit_rows=unit_rows)
        od = OutputDir(os.path.abspath(out))
        done = od.prepare({"input": plan.fingerprint(), **cfg.result_options()}, True)
        return plan, Pipeline(cfg, client, plan, od, done, protocol=protocol)

    t_start = time.time()
    with connect(cfg) as (client, protocol, _):
        t_cluster = time.time()
        _, warm = pipeline(client, protocol, warmup_path, out_dir + ".warmup", 1)
        warm.register_engines()  # returns once every worker's engine is built (vLLM: compiled too)
        t_engines = time.time()
        warm.run()
        t_ready = time.time()
        # start-up, apart from the timed run: what a user waits before the first row
        startup = {"startup_s": round(t_ready - t_start, 3), "startup": {
            "cluster_s": round(t_cluster - t_start, 3), "engines_s": round(t_engines - t_cluster, 3),
            "warmup_s": round(t_ready - t_engines, 3)}}
        names = {a: str(w["name"]) for a, w in scheduler_identity(client)["workers"].items()}
        before, cpu0 = client.run(worker_status), client.run(time.process_time)
        plan, pipe = pipeline(client, protocol, input_path, out_dir, cfg.unit_rows)
        with get_task_stream(client=client) as stream:
            t0, c0 = time.time(), time.process_time()
            pipe.started = t0
            report = pipe.run()
            wall = time.time() - t0
            driver_cpu = time.process_time() - c0
        after, cpu1 = client.run(worker_status), client.run(time.process_time)
    workers = {names.get(a, a): _status_delta(before.get(a, {}), s) for a, s in after.items()}
    process_cpu = {a: cpu1[a] - cpu0.get(a, cpu1[a]) for a in cpu1}
    for a, c in process_cpu.items():  # the process's CPU time, beside what its engine counted busy
        workers.setdefault(names.get(a, a), {})["cpu_s"] = round(c, 3)
    cpu = driver_cpu + sum(process_cpu.values())
    timeline = _timeline(stream.data, names, t0)
    outputs, ttft, tpot = _read_rows(out_dir, plan, cfg.mode, t0, stream.data)
    return SystemRun(outputs, wall, ttft, tpot, cpu, {
        "driver_cpu_s": round(driver_cpu, 3), "workers": workers, "timeline": timeline, "pdbatch_report": report,
        "unit_rows": cfg.unit_rows, "units": len(plan.units), **startup, **_roles(report), **_repeats(stream.data)})


def _roles(report: dict) -> dict:
    """The driver's roles over the run (disaggregated): where each worker started and every
    switch, in seconds from the start of the timed run (the plots draw them under the lanes)."""
    if "roles" not in report:
        return {}
    return {"roles": report["roles"], "role_switches": report.get("role_switches", [])}


def _repeats(data: list) -> dict:
    """Work done twice: tasks Dask computed again (a result lost, e.g. a transfer that timed out
    on an overloaded machine, is recomputed from lineage) and units the driver restarted."""
    from collections import Counter

    keys = Counter(rec["key"] for rec in data if isinstance(rec["key"], str)
                   and rec["key"].split("-")[0] in PHASES)
    retried = {"-".join(k.split("-")[1:4]) for k in keys if not k.endswith("-0")}
    return {"tasks_computed_again": sum(n - 1 for n in keys.values()), "units_restarted": len(retried)}


def _status_delta(before: dict, after: dict) -> dict:
    keys = ("prefill_tokens", "prefill_busy_s", "decode_tokens", "decode_busy_s", "decode_steps")
    out = {"roles": after.get("roles", [])}
    for k in keys:
        if k in after:
            out[k] = round(after[k] - before.get(k, 0), 4)
    if out.get("decode_steps"):
        out["decode_mean_batch"] = round(out["decode_tokens"] / out["decode_steps"], 2)
    return out


def _timeline(data: list, names: dict, t0: float) -> list:
    """[worker, phase, start, stop] (seconds from t0) for task computes and KV transfers."""
    spans = []
    for rec in data:
        phase = rec["key"].split("-")[0] if isinstance(rec["key"], str) else ""
        if phase not in PHASES:
            continue
        worker = names.get(rec["worker"], rec["worker"])
        for ss in rec.get("startstops", []):
            kind = phase if ss["action"] == "compute" else "transfer" if ss["action"] == "transfer" else None
            if kind and ss["stop"] >= t0:
                spans.append([worker, kind, round(ss["start"] - t0, 4), round(ss["stop"] - t0, 4)])
    return sorted(spans, key=lambda s: (s[0], s[2]))


def _read_rows(out_dir, plan, mode, t0, stream) -> tuple[list, list, list]:
    first_phase = "generate" if mode == "colocated" else "prefill"
    starts = {}  # unit id -> start of its (last) prefill or generate task
    for rec in stream:
        parts = rec["key"].split("-") if isinstance(rec["key"], str) else []
        if parts and parts[0] == first_phase:
            unit = "-".join(parts[1:4])
            for ss in rec.get("startstops", []):
                if ss["action"] == "compute":
                    starts[unit] = max(starts.get(unit, 0.0), ss["start"])
    import pyarrow.dataset as ds

    unit_of = {u.file_row + i: u.unit_id for u in plan.units for i in range(u.num_rows)}
    table = ds.dataset(out_dir, format="parquet").to_table(
        columns=["id", "output_token_ids", "ttft_s", "tpot_s", "error"]).to_pylist()
    errors = [r for r in table if r["error"]]
    if errors:
        raise RuntimeError(f"{len(errors)} rows failed in pdbatch, first: {errors[0]['error']}")
    n = plan.total_rows
    outputs, ttft, tpot = [None] * n, [], []
    for r in table:
        i = int(r["id"])
        outputs[i] = list(r["output_token_ids"])
        ttft.append(starts[unit_of[i]] - t0 + r["ttft_s"])
        if r["tpot_s"] is not None:
            tpot.append(r["tpot_s"])
    return outputs, ttft, tpot


# --- in-process baselines (pdbatch.bench.engine), timed from the outside ----------------------

@contextmanager
def _forward_clock(model):
    """Per model.generate call: (prompts of the batch, end time of each forward pass)."""
    calls = []
    generate = model.generate

    def timed_generate(*args, input_ids=None, attention_mask=None, **kw):
        prompts = [tuple(ids[m.bool()].tolist()) for ids, m in zip(input_ids, attention_mask)]
        calls.append((prompts, []))
        return generate(*args, input_ids=input_ids, attention_mask=attention_mask, **kw)

    hook = model.register_forward_hook(lambda *_: calls[-1][1].append(time.perf_counter()) if calls else None)
    model.generate = timed_generate  # an instance attribute shadows the method
    try:
        yield calls
    finally:
        hook.remove()
        del model.generate


@contextmanager
def _cb_results(model):
    """Finished continuous-batching results by request id, with per-token timestamps."""
    results = {}
    init = model.init_continuous_batching

    def timed_init(*args, **kw):
        manager = init(*args, **kw)
        add, get = manager.add_request, manager.get_result

        def add_request(*a, **k):
            k.setdefault("record_timestamps", True)
            return add(*a, **k)

        def get_result(*a, **k):
            r = get(*a, **k)
            if r is not None and r.is_finished():
                results[r.request_id] = r
            return r

        manager.add_request, manager.get_result = add_request, get_result
        return manager

    model.init_continuous_batching = timed_init
    try:
        yield results
    finally:
        del model.init_continuous_batching


def run_baseline(name: str, lm, work, args) -> SystemRun:
    from pdbatch.bench import engine

    if name == "vllm":  # every core the in-process baselines get (torch's thread count, set by the caller)
        import torch

        from pdbatch.bench.vllm_baseline import run_vllm

        r = run_vllm(lm.path, work, cores=torch.get_num_threads(), dtype=str(lm.dtype).removeprefix("torch."),
                     max_num_seqs=args.max_num_seqs, max_batch_tokens=args.max_batch_tokens,
                     kv_budget_bytes=args.kv_budget_bytes,  # what a pdbatch decode engine gets
                     enforce_eager=args.enforce_eager)
        tpot = [_tpot(a, b, n) for a, b, n in r["token_times"] if n > 1]
        return SystemRun(r["outputs"], r["wall_s"], r["ttft_s"], tpot, r["cpu_s"],
                         {"startup_s": r["startup_s"], "vllm": r["version"], "llm_kwargs": r["llm_kwargs"]})

    runner = {"hf_generate": engine.run_hf_generate, "generate_batch": engine.run_generate_batch}[name]
    runner(lm, _warm(work), args)
    clock = _forward_clock if name == "hf_generate" else _cb_results
    with clock(lm.model) as record:
        t0, c0 = time.perf_counter(), time.process_time()
        outputs = runner(lm, work, args)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    ttft, tpot = [], []
    if name == "hf_generate":
        rows = {}
        for i, p in enumerate(work.prompts):
            rows.setdefault(tuple(p), []).append(i)
        for prompts, ends in record:
            for p in prompts:
                i = rows[p].pop(0)
                k = min(len(outputs[i]), len(ends))
                ttft.append(ends[0] - t0)
                if k > 1:
                    tpot.append(_tpot(ends[0], ends[k - 1], k))
        extra = {}
    else:
        for i in range(len(work.prompts)):
            ts = record[str(i)].timestamps
            ttft.append(ts[0] - t0)
            if len(ts) > 1:
                tpot.append(_tpot(ts[0], ts[-1], len(ts)))
        # set-up inside the timed call (paged cache allocation, static tensors cleared) until
        # the first request was scheduled; counted in wall_s and TTFT like all other work
        extra = {"startup_s": round(min(r.lifespan[0] for r in record.values()) - t0, 3)}
    return SystemRun(outputs, wall, ttft, tpot, cpu, extra)


def _warm(work):
    from pdbatch.bench.workloads import warmup_workload

    return warmup_workload(work, 2)


def default_systems() -> list[str]:
    from pdbatch.engines.vllm.settings import vllm_available

    return [s for s in SYSTEMS if s != "vllm" or vllm_available()]


def check_systems(names: list[str]) -> list[str]:
    bad = [n for n in names if n not in SYSTEMS]
    if bad or not names:
        raise UserError(f"unknown system(s) {', '.join(bad) or '(none)'}; choose from {', '.join(SYSTEMS)}")
    if "vllm" in names:  # before any system runs, not after the others took minutes
        from pdbatch.engines.vllm.settings import require_vllm

        require_vllm()
    return names
