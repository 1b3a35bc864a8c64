"""`pdbatch bench`: one workload through every system, outputs checked equal, then the figures
(bench.json, PNG plots, a table). The systems and how each is timed: pdbatch/bench/systems.py."""

from __future__ import annotations

import datetime
import json
import math
import os
import platform
import sys
from dataclasses import dataclass

from pdbatch.bench.systems import BASELINES, PDBATCH_SYSTEMS, SystemRun, run_baseline, run_pdbatch
from pdbatch.bench.workloads import (ID_COLUMN, PROMPT_COLUMN, WorkloadSpec, make_workload, token_pool,
                                     warmup_workload, write_input)
from pdbatch.config import DEFAULT_MODEL, build_config, parse_size
from pdbatch.driver.roles import auto_unit_rows
from pdbatch.errors import UserError
from pdbatch.monitoring.report import percentile

MODEL_ALIASES = ("tiny", "bench-30m")


@dataclass
class BenchOptions:
    spec: WorkloadSpec
    out: str
    model: str = "tiny"
    systems: tuple = PDBATCH_SYSTEMS + BASELINES[:2]  # the CLI adds vllm where vLLM is installed
    prefill_workers: int = 1
    decode_workers: int = 1
    threads_per_worker: int = 0  # 0: cores / workers
    baseline_threads: int = 0  # 0: workers x threads_per_worker, every core pdbatch uses
    unit_rows: int = 0  # 0: pdbatch's own default (driver/roles.auto_unit_rows)
    rebalance: bool = True  # disaggregated: pdbatch's default, workers move between the roles
    engine: str = "builtin"  # the pdbatch systems' engine (builtin | vllm)
    enforce_eager: bool = False  # vLLM everywhere (vllm system, --engine vllm): vLLM's default, compiled
    max_batch_tokens: int | None = None  # None: pdbatch's default for the device
    max_num_seqs: int = 64
    kv_budget: str = "1GiB"
    hf_batch_size: int = 16
    repeat: int = 1  # rounds of every system, alternating their order (see run_bench)
    allow_mismatch: float = 0.0  # share of rows whose greedy output may differ (bf16 on GPUs)
    dtype: str = "auto"
    device: str = "auto"

    @property
    def workers(self) -> int:
        return self.prefill_workers + self.decode_workers

    def threads(self) -> int:
        return self.threads_per_worker or max(1, (os.cpu_count() or 1) // self.workers)


def resolve_model(name: str) -> tuple[str, str]:
    """(label, directory) for `tiny`, `bench-30m` (built once into a cache dir) or a path."""
    if name == "tiny":
        return "tiny", DEFAULT_MODEL
    if name == "bench-30m":
        from pdbatch.bench.engine import model_dir

        return "bench-30m", str(model_dir(None))
    if not os.path.isdir(name):
        raise UserError(f"--model must be tiny, bench-30m or a model directory, got {name!r}")
    return os.path.basename(os.path.normpath(name)), os.path.abspath(name)


def machine_info() -> dict:
    import dask
    import distributed
    import torch
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] \
        if torch.cuda.is_available() else []
    return {"cores": os.cpu_count(), "gpus": gpus, "gpu": gpus[0] if gpus else None,
            "torch": torch.__version__, "transformers": transformers.__version__,
            "dask": dask.__version__, "distributed": distributed.__version__,
            "python": platform.python_version(), "platform": platform.platform(),
            "load_average_start": list(os.getloadavg())}


def run_bench(o: BenchOptions, echo=print, command: str | None = None) -> tuple[int, dict | None]:
    import torch

    from pdbatch.engines.builtin.model import load_model
    from pdbatch.engines.builtin.prefill import default_max_batch_tokens
    from pdbatch.engines.model_dir import vocab_size

    label, path = resolve_model(o.model)
    threads = o.threads()
    baseline_threads = o.baseline_threads or threads * o.workers  # every core the pdbatch workers share
    # for the HF baselines; a model the built-in engine refuses is the pdbatch systems' to refuse
    lm = load_model(path, dtype=o.dtype, device=o.device, tuned=False, builtin_exact=o.engine == "builtin")
    o.max_batch_tokens = o.max_batch_tokens or default_max_batch_tokens(lm.device)  # every system's
    o.spec.check_fits(lm.max_model_len)
    work = make_workload(o.spec, token_pool(lm.tokenizer, vocab_size(lm.model.config)))  # as `pdbatch plan` does
    os.makedirs(o.out, exist_ok=True)
    input_path = write_input(work, os.path.join(o.out, "workload.parquet"))
    warm_path = write_input(warmup_workload(work, 2 * o.workers), os.path.join(o.out, "warmup.parquet"))
    # pdbatch's defaults: the unit size `pdbatch run` picks for this many rows and workers, and
    # the window it derives from it (enough small units to fill every decode batch)
    unit_rows = o.unit_rows or auto_unit_rows(o.spec.rows, o.workers)
    info = machine_info()
    echo(f"pdbatch bench: workload {o.spec.name}, {o.spec.rows} rows ({sum(map(len, work.prompts))} prompt / "
         f"{work.output_tokens} output tokens), model {label}, {o.prefill_workers}:{o.decode_workers} workers x "
         f"{threads} thread(s), {info['cores']} cores, load {info['load_average_start'][0]:.2f}")
    if info["load_average_start"][0] > 0.5 * (info["cores"] or 1):
        echo("  the machine is busy: figures will be noisy"
             + ("; multi-threaded baselines spin-wait for busy cores (set OMP_WAIT_POLICY=PASSIVE)"
                if baseline_threads > 1 and set(o.systems) & set(BASELINES)
                and os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE" else ""))

    args = _engine_args(o, lm, work)
    rounds: dict[str, list[SystemRun]] = {name: [] for name in o.systems}
    window = None
    # Rounds alternate the systems' order (A B, B A, A B, ...): on a shared machine speed drifts
    # by 10-15 % over a minute, and a fixed order would hand one system the slow half of it. Each
    # round's systems ran next to each other, so a round's ratios are a paired comparison.
    for k in range(o.repeat):
        order = o.systems if k % 2 == 0 else tuple(reversed(o.systems))
        for name in order:
            echo(f"  running {name}{f' (round {k + 1} of {o.repeat})' if o.repeat > 1 else ''} ...")
            if name in PDBATCH_SYSTEMS:
                out_dir = os.path.join(o.out, "runs", name if k == 0 else f"{name}.round{k + 1}")
                cfg = build_config({
                    "input": input_path, "output": out_dir, "model": path,
                    "prompt_column": PROMPT_COLUMN, "id_column": ID_COLUMN, "ignore_eos": True, "temperature": 0.0,
                    "mode": name, "prefill_workers": o.prefill_workers, "decode_workers": o.decode_workers,
                    "threads_per_worker": threads, "unit_rows": unit_rows, "rebalance": o.rebalance,
                    "engine": o.engine, "enforce_eager": o.enforce_eager, "max_batch_tokens": o.max_batch_tokens,
                    "max_num_seqs": o.max_num_seqs, "kv_budget": o.kv_budget, "dtype": o.dtype, "device": o.device,
                    "progress": "none", "overwrite": True})
                window = cfg.inflight_units()
                r = run_pdbatch(cfg, input_path, warm_path, cfg.output, echo)
            else:
                torch.set_num_threads(baseline_threads)
                r = run_baseline(name, lm, work, args)
            r.extra["round"] = k + 1
            rounds[name].append(r)
            again = r.extra.get("tasks_computed_again", 0) + r.extra.get("units_restarted", 0)
            # no figures yet: they are printed only once the outputs are known to agree
            echo("    done" + (f" ({r.extra['tasks_computed_again']} tasks computed again, {r.extra['units_restarted']} "
                                   f"units restarted: lost results were redone, the figures include that work)"
                                   if again else ""))

    # every run of every system against the first system's first run
    every = {(name if r.extra["round"] == 1 else f"{name} (round {r.extra['round']})"): r
             for name in o.systems for r in rounds[name]}
    lines, differing, wrong_length = compare_outputs(every, work.out_lens)
    allowed = math.floor(o.allow_mismatch * o.spec.rows)
    if wrong_length or any(len(rows) > allowed for rows in differing.values()):
        echo("pdbatch bench: greedy outputs differ between systems; no figures reported")
        for line in lines:
            echo(f"  {line}")
        return 1, None
    for line in lines:  # within --allow-mismatch
        echo(f"  outputs: {line} (allowed: {allowed} rows)")
    runs = {name: median_run(rs) for name, rs in rounds.items()}

    result = {
        "command": command or " ".join(sys.argv), "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "machine": {**info, "load_average_end": list(os.getloadavg())},
        "workload": {**o.spec.to_dict(), "prompt_tokens": sum(map(len, work.prompts)),
                     "output_tokens": work.output_tokens, "input": input_path},
        "model": {"name": label, "path": path, "dtype": str(lm.dtype).replace("torch.", ""),
                  "device": str(lm.device), "parameters": sum(p.numel() for p in lm.model.parameters())},
        "settings": {"prefill_workers": o.prefill_workers, "decode_workers": o.decode_workers,
                     "colocated_workers": o.workers, "threads_per_worker": threads,
                     "baseline_threads": baseline_threads, "unit_rows": unit_rows, "rebalance": o.rebalance,
                     "engine": o.engine, "enforce_eager": o.enforce_eager,
                     "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
                     "max_inflight_units": window, "baseline_kv_budget_mib": args.kv_budget_mib,
                     "max_batch_tokens": o.max_batch_tokens, "max_num_seqs": o.max_num_seqs,
                     "kv_budget": o.kv_budget, "hf_batch_size": o.hf_batch_size, "repeat": o.repeat,
                     "sampling": "greedy, EOS ignored, per-row max_new_tokens"},
        "outputs_equal": not lines, "reference_system": o.systems[0],
        "rows_differing": {n: rows for n, rows in differing.items() if rows},
        "systems": {name: summarize(r, work.output_tokens, _devices(name, lm, o, threads, baseline_threads))
                    for name, r in runs.items()},
    }
    if o.repeat > 1:
        for name, s in result["systems"].items():
            s["rounds"] = [round_figures(r, work.output_tokens) for r in rounds[name]]
    result["ratios"] = ratios(result["systems"])
    if o.repeat > 1:
        result["ratios"]["rounds"] = round_ratios(result["systems"])
    from pdbatch.bench.plots import write_plots

    result["plots"] = [os.path.basename(p) for p in write_plots(result, o.out)]
    with open(os.path.join(o.out, "bench.json"), "w") as f:
        json.dump(result, f, indent=1)
    for line in table(result):
        echo(line)
    echo(f"wrote {os.path.join(o.out, 'bench.json')} and {', '.join(result['plots'])}")
    return 0, result


def _engine_args(o: BenchOptions, lm, work):
    """Options of the engine benchmark's baselines. generate_batch allocates (and clears) its
    whole paged KV cache up front, which pdbatch's cache, grown on demand, never does; so its
    budget is what the workload can use at most (every row resident, 256-token pages), capped
    by --kv-budget."""
    from types import SimpleNamespace

    from pdbatch.engines.builtin.decode import kv_bytes_per_token

    page = 256 * kv_bytes_per_token(lm)
    need = sum(math.ceil((len(p) + k) / 256) + 1 for p, k in zip(work.prompts, work.out_lens)) * page
    mib = min(parse_size(o.kv_budget), need) / 2**20
    return SimpleNamespace(hf_batch_size=o.hf_batch_size, max_batch_tokens=o.max_batch_tokens,
                           max_num_seqs=o.max_num_seqs, kv_budget_mib=max(1, math.ceil(mib)),
                           kv_budget_bytes=parse_size(o.kv_budget), enforce_eager=o.enforce_eager)


def compare_outputs(runs: dict[str, SystemRun], out_lens: list[int]) -> tuple[list[str], dict, bool]:
    """(lines saying which rows differ, differing rows per system, whether any row has the wrong
    length): every system's greedy output against the first system's."""
    ref_name, ref = next(iter(runs.items()))
    lines, differing, wrong_length = [], {}, False
    for name, r in runs.items():
        wrong_len = [i for i, (o, k) in enumerate(zip(r.outputs, out_lens)) if o is None or len(o) != k]
        if wrong_len:
            wrong_length = True
            lines.append(f"{name}: rows {_few(wrong_len)} do not have their requested length")
        if name != ref_name:
            diff = [i for i, (a, b) in enumerate(zip(ref.outputs, r.outputs)) if a != b]
            differing[name] = diff
            if diff:
                i = diff[0]
                at = next((t for t, (x, y) in enumerate(zip(ref.outputs[i], r.outputs[i] or [])) if x != y), None)
                lines.append(f"{name} vs {ref_name}: rows {_few(diff)} differ (row {i}: first at token {at})")
    return lines, differing, wrong_length


def mismatches(runs: dict[str, SystemRun], out_lens: list[int]) -> list[str]:
    return compare_outputs(runs, out_lens)[0]


def _devices(name: str, lm, o: BenchOptions, threads: int, baseline_threads: int) -> dict:
    """What a system ran on: GPUs (one per pdbatch worker, one for the in-process baselines)
    or CPU cores (worker threads, baseline threads)."""
    if lm.device.type == "cuda":
        import torch

        n = min(o.workers, torch.cuda.device_count()) if name in PDBATCH_SYSTEMS else 1
        return {"kind": "gpu", "count": n}
    return {"kind": "cpu core", "count": o.workers * threads if name in PDBATCH_SYSTEMS else baseline_threads}


def _few(rows: list[int], n: int = 20) -> str:
    return ", ".join(map(str, rows[:n])) + (f" ... ({len(rows)} rows)" if len(rows) > n else "")


def summarize(r: SystemRun, output_tokens: int, devices: dict | None = None) -> dict:
    ttft, tpot = r.ttft_s, [x for x in r.tpot_s if x is not None]
    devices = devices or {"kind": "cpu core", "count": 1}
    out = {"output_tokens": output_tokens, "wall_s": round(r.wall_s, 3),
           "output_tokens_per_s": round(output_tokens / r.wall_s, 2), "devices": devices,
           "output_tokens_per_s_per_device": round(output_tokens / r.wall_s / max(1, devices["count"]), 2),
           "ttft_p50_s": percentile(ttft, 50), "ttft_p99_s": percentile(ttft, 99),
           "tpot_p50_s": percentile(tpot, 50), "tpot_p99_s": percentile(tpot, 99),
           "cpu_s": round(r.cpu_s, 2) if r.cpu_s else None,
           "output_tokens_per_cpu_s": round(output_tokens / r.cpu_s, 2) if r.cpu_s else None,
           "per_row": {"ttft_s": ttft, "tpot_s": r.tpot_s}}
    out.update(r.extra)
    return out


def median_run(runs: list[SystemRun]) -> SystemRun:
    """The run whose throughput is the median (with an even count, the slower of the middle two):
    an actual run, so its per-row figures, timeline and report belong together."""
    ordered = sorted(runs, key=lambda r: -r.wall_s)
    return ordered[(len(ordered) - 1) // 2]


def round_figures(r: SystemRun, output_tokens: int) -> dict:
    """One round's headline figures, for `systems.<name>.rounds` (--repeat)."""
    s = summarize(r, output_tokens)
    return {"round": r.extra["round"], **{k: s[k] for k in (
        "wall_s", "output_tokens_per_s", "cpu_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")}}


def round_ratios(systems: dict) -> dict:
    """Disaggregated over colocated within each round (the two ran side by side) and the median
    of those paired ratios: steadier than a ratio of medians when the machine's speed drifts."""
    d, c = systems.get("disaggregated", {}).get("rounds"), systems.get("colocated", {}).get("rounds")
    if not d or not c:
        return {}
    out = {}
    for key in ("output_tokens_per_s", "tpot_p99_s"):
        per = [round(a[key] / b[key], 3) if a[key] and b[key] else None for a, b in zip(d, c)]
        known = sorted(x for x in per if x is not None)
        out[f"disaggregated_over_colocated_{key}"] = {
            "per_round": per, "median": known[(len(known) - 1) // 2] if known else None}
    return out


def ratios(systems: dict) -> dict:
    def ratio(a, b, key):
        x, y = systems.get(a, {}).get(key), systems.get(b, {}).get(key)
        return round(x / y, 3) if x and y else None

    out = {"disaggregated_over_colocated": {k: ratio("disaggregated", "colocated", k) for k in (
        "output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s")}}
    for p in PDBATCH_SYSTEMS:
        for b in BASELINES:
            out[f"{p}_over_{b}_output_tokens_per_s"] = ratio(p, b, "output_tokens_per_s")
    return out


def table(result: dict) -> list[str]:
    def ms(x):
        return f"{x * 1000:8.1f}" if x is not None else f"{'-':>8}"

    repeat = result["settings"].get("repeat", 1)
    lines = ([""] + ([f"each system's median run of {repeat} rounds"] if repeat > 1 else [])
             + [f"{'system':<15} {'wall s':>7} {'tok/s':>8} {'tok/CPU-s':>9} {'TTFT p50':>8} {'p99':>8} "
                 f"{'TPOT p50':>8} {'p99':>8}   (TTFT/TPOT in ms; TTFT from the start of the run)"])
    for name, s in result["systems"].items():
        cpu = f"{s['output_tokens_per_cpu_s']:9.1f}" if s.get("output_tokens_per_cpu_s") else f"{'-':>9}"
        lines.append(f"{name:<15} {s['wall_s']:7.1f} {s['output_tokens_per_s']:8.1f} {cpu} {ms(s['ttft_p50_s'])} "
                     f"{ms(s['ttft_p99_s'])} {ms(s['tpot_p50_s'])} {ms(s['tpot_p99_s'])}")
    r = result["ratios"]
    d = r["disaggregated_over_colocated"]
    if d["output_tokens_per_s"]:
        lines.append(f"disaggregated / colocated: output tok/s {d['output_tokens_per_s']}, "
                     f"TTFT p50 {d['ttft_p50_s']}, TPOT p99 {d['tpot_p99_s']}")
    for key, label in (("output_tokens_per_s", "output tok/s"), ("tpot_p99_s", "TPOT p99")):
        per = r.get("rounds", {}).get(f"disaggregated_over_colocated_{key}")
        if per:
            lines.append(f"  per round (side by side): {label} {', '.join(map(str, per['per_round']))}; "
                         f"median {per['median']}")
    for k, v in r.items():
        if k.endswith("_output_tokens_per_s") and v is not None:
            lines.append(f"{k.removesuffix('_output_tokens_per_s').replace('_over_', ' / ')}: output tok/s {v}")
    # generate_batch's startup_s is set-up inside its timed call, counted in its wall_s
    up = [f"{name} {s['startup_s']:.1f}" for name, s in result["systems"].items()
          if name in (*PDBATCH_SYSTEMS, "vllm") and s.get("startup_s") is not None]
    if up:
        lines.append("start-up s (not in wall s; cluster, engine build/compile, warm-up): " + ", ".join(up))
    lines.append(("greedy outputs: equal across " if result["outputs_equal"] else
                  "greedy outputs: within --allow-mismatch across ") + ", ".join(result["systems"]))
    return lines
