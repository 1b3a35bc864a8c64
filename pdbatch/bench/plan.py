"""`pdbatch plan`: how many prefill and how many decode workers for a model and a workload.

Short calibration runs of the chosen engine (`--engine builtin|vllm`), through the one engine
seam (pdbatch.engines.base) and with the threads one worker would have, in a child process
started with the environment a worker of that engine gets (Engine.worker_environment: vLLM's
preloads work only from process start, and vLLM resets torch's threads and RNGs process-wide):
- prefill: a sample of the workload's prompts through Engine.prefill -> prefill rows/s and
  prompt tokens/s of one prefill worker;
- decode: KV packets of contexts as long as the workload's mid-generation ones (prompt + half
  the output) submitted B at a time for B = 1, 2, 4, ... up to max_num_seqs, the engine's own
  decode step times (EngineStats.recent_step_s) -> output tokens/s of one decode worker at
  each batch size.

With P prefill and D decode workers (P + D = N) the pipeline's steady rate is at most
min(P x prefill rows/s, D x decode rows/s); the plan picks the split with the highest bound,
and the decode batch size as the smallest one within 10% of the best decode rate. A colocated
worker does both, so N of them run at N / (1/prefill + 1/decode) rows/s: with the split's
integer rounding, disaggregation can only beat that by batching each phase better, never by
the arithmetic alone (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

from pdbatch.bench.engine import Workload
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams
from pdbatch.errors import UserError

DECODE_STEPS, WARMUP_STEPS = 8, 2


def calibrate(options: dict, work: Workload, *, sample_rows: int = 16, timeout_s: float = 1800) -> dict:
    """calibrate_here in a child process with a worker's environment for options["engine"].
    options: what create_engine takes (engine, model, dtype, device, threads, max_batch_tokens,
    max_num_seqs, max_model_len, kv_budget_bytes, enforce_eager)."""
    from pdbatch.engines import engine_class

    env = {**os.environ, **engine_class(options["engine"]).worker_environment(options)}
    env["OMP_NUM_THREADS"] = str(options["threads"])
    with tempfile.TemporaryDirectory(prefix="pdbatch-plan-") as tmp:
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump({"options": options, "prompts": work.prompts, "out_lens": work.out_lens,
                       "sample_rows": sample_rows}, f)
        proc = subprocess.run([sys.executable, "-m", "pdbatch.bench.plan", src, dst], env=env, timeout=timeout_s,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode == 2 and os.path.exists(dst):  # the engine refused the model or an option
            with open(dst) as f:
                raise UserError(json.load(f)["user_error"])
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise RuntimeError(f"the {options['engine']} engine's calibration failed (exit {proc.returncode}):\n{tail}")
        with open(dst) as f:
            return json.load(f)


def calibrate_here(options: dict, work: Workload, sample_rows: int = 16) -> dict:
    """The measurements, in this process: one engine with both roles, built once."""
    from pdbatch.engines import create_engine

    engine = create_engine(options["engine"], options, {"prefill", "decode"}, "plan")
    try:
        n = min(sample_rows, len(work.prompts))
        mean_out = statistics.fmean(work.out_lens)
        engine.prefill([_request(i, p[:16], 2) for i, p in enumerate(work.prompts[:2])])  # warm-up
        tokens = sum(len(p) for p in work.prompts[:n])
        times = []
        for k in range(2):  # best of two: the machine may be shared
            # each pass rotated differently: an engine's prefix cache (vLLM's) must not serve it
            reqs = [_request(i, p[k + 1:] + p[:k + 1], work.out_lens[i]) for i, p in enumerate(work.prompts[:n])]
            t0 = time.perf_counter()
            engine.prefill(reqs)
            times.append(time.perf_counter() - t0)
        t = min(times)
        out = {"engine": options["engine"], "threads": options["threads"], "sample_rows": n,
               "mean_prompt_tokens": tokens / n, "mean_output_tokens": mean_out,
               "prefill_rows_per_s": n / t, "prefill_tokens_per_s": tokens / t}
        out["decode"] = decode_rates(engine, work, n, options["max_num_seqs"])
    finally:
        engine.close()
    best = max(d["output_tokens_per_s"] for d in out["decode"])
    pick = min((d for d in out["decode"] if d["output_tokens_per_s"] >= 0.9 * best), key=lambda d: d["batch"])
    out["decode_batch"] = pick["batch"]
    out["decode_tokens_per_s"] = pick["output_tokens_per_s"]
    out["decode_rows_per_s"] = pick["output_tokens_per_s"] / mean_out
    return out


def _request(i: int, prompt: list[int], max_new_tokens: int) -> Request:
    return Request(str(i), list(prompt), SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def decode_rates(engine, work: Workload, n: int, max_num_seqs: int) -> list[dict]:
    """Median decode step time at batch sizes 1, 2, 4, ..., on mid-generation contexts."""
    from pdbatch.kv.packet import KVPacket

    # contexts = prompt + half the output: the middle of each row's decode
    ctx = [list(work.prompts[i]) + list(work.prompts[i][:1]) * (work.out_lens[i] // 2) for i in range(n)]
    packets = [p for p in engine.prefill([_request(i, c, 2) for i, c in enumerate(ctx)]) if isinstance(p, KVPacket)]
    if not packets:
        raise RuntimeError("no sample row could be prefilled for decode")
    params = SamplingParams(max_new_tokens=DECODE_STEPS + WARMUP_STEPS + 2, ignore_eos=True)
    limit = min(max_num_seqs, len(work.prompts))
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < limit] + [limit]
    rates = []
    for batch in sizes:
        before = engine.stats().decode_steps
        futs = [engine.submit_packet(dataclasses.replace(packets[i % len(packets)], seq_id=f"c{batch}-{i}",
                                                         params=params)) for i in range(batch)]
        for f in futs:
            f.result()
        s = engine.stats()
        taken = s.decode_steps - before
        if rates and taken > 1.5 * (DECODE_STEPS + WARMUP_STEPS + 1):
            break  # the KV budget did not admit the batch at once: larger ones measure the same
        steps = s.recent_step_s[-max(1, taken):]
        full = steps[WARMUP_STEPS:-1] or steps  # the batch is whole between admission and the last step
        step = statistics.median(full)
        rates.append({"batch": batch, "step_s": step, "output_tokens_per_s": batch / step})
    return rates


def recommend(cal: dict, workers: int) -> dict:
    """The P:D split of `workers` with the highest bounded rate, and the colocated estimate."""
    rp, rd = cal["prefill_rows_per_s"], cal["decode_rows_per_s"]
    splits = []
    for p in range(1, workers):
        d = workers - p
        splits.append({"prefill_workers": p, "decode_workers": d, "rows_per_s": min(p * rp, d * rd),
                       "prefill_capacity_rows_per_s": p * rp, "decode_capacity_rows_per_s": d * rd,
                       "bottleneck": "prefill" if p * rp < d * rd else "decode"})
    best = max(splits, key=lambda s: (s["rows_per_s"], s["decode_workers"])) if splits else None
    return {
        "workers": workers, "splits": splits, "best": best,
        "ideal_prefill_share": rd / (rp + rd),  # P / N that balances the two stages exactly
        "colocated_rows_per_s": workers / (1 / rp + 1 / rd),
        "decode_batch": cal["decode_batch"],
    }


def plan_lines(cal: dict, rec: dict) -> list[str]:
    mo = cal["mean_output_tokens"]
    lines = [f"per worker ({cal['threads']} thread(s)), from {cal['sample_rows']} sample rows "
             f"(mean {cal['mean_prompt_tokens']:.0f} prompt / {mo:.0f} output tokens):",
             f"  prefill  {cal['prefill_tokens_per_s']:9.0f} prompt tokens/s = {cal['prefill_rows_per_s']:7.2f} rows/s",
             "  decode   " + ", ".join(f"batch {d['batch']}: {d['output_tokens_per_s']:.0f} tok/s"
                                     for d in cal["decode"]),
             f"           batch {cal['decode_batch']}: {cal['decode_tokens_per_s']:.0f} output tokens/s = "
             f"{cal['decode_rows_per_s']:.2f} rows/s",
             f"splits of {rec['workers']} workers (rows/s bound = min(P x prefill, D x decode)):"]
    for s in rec["splits"]:
        mark = "  <- best" if s is rec["best"] else ""
        lines.append(f"  {s['prefill_workers']}:{s['decode_workers']}  {s['rows_per_s']:7.2f} rows/s "
                     f"= {s['rows_per_s'] * mo:8.0f} output tok/s  ({s['bottleneck']}-bound){mark}")
    lines.append(f"  colocated x{rec['workers']}  {rec['colocated_rows_per_s']:7.2f} rows/s "
                 f"= {rec['colocated_rows_per_s'] * mo:8.0f} output tok/s  (estimate)")
    lines.append(f"  balanced prefill share: {rec['ideal_prefill_share']:.2f} of the workers")
    b = rec["best"]
    if b and rec["colocated_rows_per_s"] > b["rows_per_s"]:
        lines.append(f"  note: {rec['workers']} colocated workers are estimated faster than any split: the split "
                     f"idles the non-bottleneck workers; disaggregate for steadier TPOT, or with more workers")
    if b:
        lines.append(f"recommended: --prefill-workers {b['prefill_workers']} --decode-workers {b['decode_workers']} "
                     f"--max-num-seqs {max(rec['decode_batch'], 1)}")
    else:
        lines.append("recommended: colocated (disaggregation needs at least 2 workers)")
    return lines


def default_workers(threads: int) -> int:
    return max(2, (os.cpu_count() or 1) // max(1, threads))


if __name__ == "__main__":
    with open(sys.argv[1]) as f:
        job = json.load(f)
    try:
        result = calibrate_here(job["options"], Workload(prompts=job["prompts"], out_lens=job["out_lens"]),
                                job["sample_rows"])
    except UserError as e:  # found only when the engine is built: one line in the parent, exit 2
        with open(sys.argv[2], "w") as f:
            json.dump({"user_error": str(e)}, f)
        sys.exit(2)
    with open(sys.argv[2], "w") as f:
        json.dump(result, f)
