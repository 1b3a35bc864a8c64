"""`pdbatch plan`: how many prefill and how many decode workers for a model and a workload.

Short calibration runs of pdbatch's own engines, in this process, with the torch threads one
worker would have:
- prefill: a sample of the workload's prompts through PrefillEngine (length-bucketed batches,
  the worker's max_batch_tokens) -> prefill rows/s and prompt tokens/s of one prefill worker;
- decode: DecodeEngine steps at batch sizes 1, 2, 4, ... up to max_num_seqs (and what the KV
  budget admits), on contexts as long as the workload's mid-generation ones (prompt + half the
  output) -> output tokens/s of one decode worker at each batch size.

With P prefill and D decode workers (P + D = N) the pipeline's steady rate is at most
min(P x prefill rows/s, D x decode rows/s); the plan picks the split with the highest bound,
and the decode batch size as the smallest one within 10% of the best decode rate. A colocated
worker does both, so N of them run at N / (1/prefill + 1/decode) rows/s: with the split's
integer rounding, disaggregation can only beat that by batching each phase better, never by
the arithmetic alone (docs/benchmarks.md).
"""

from __future__ import annotations

import dataclasses
import os
import statistics
import time

from pdbatch.bench.engine import Workload
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams

DECODE_STEPS, WARMUP_STEPS = 8, 2


def calibrate(lm, work: Workload, *, threads: int, max_batch_tokens: int, max_num_seqs: int,
              kv_budget_bytes: int, sample_rows: int = 16) -> dict:
    import torch

    from pdbatch.engines.builtin.prefill import PrefillEngine

    torch.set_num_threads(threads)
    n = min(sample_rows, len(work.prompts))
    mean_out = statistics.fmean(work.out_lens)
    prefill = PrefillEngine(lm, max_batch_tokens)
    prefill.run([_request(i, p[:16], 2) for i, p in enumerate(work.prompts[:2])])  # warm-up
    reqs = [_request(i, work.prompts[i], work.out_lens[i]) for i in range(n)]
    tokens = sum(len(r.prompt_ids) for r in reqs)
    times = []
    for _ in range(2):  # best of two: the machine may be shared
        t0 = time.perf_counter()
        prefill.run(reqs)
        times.append(time.perf_counter() - t0)
    t = min(times)
    out = {"threads": threads, "sample_rows": n, "mean_prompt_tokens": tokens / n,
           "mean_output_tokens": mean_out, "prefill_rows_per_s": n / t, "prefill_tokens_per_s": tokens / t}
    out["decode"] = decode_rates(lm, work, prefill, n, max_num_seqs, kv_budget_bytes)
    best = max(d["output_tokens_per_s"] for d in out["decode"])
    pick = min((d for d in out["decode"] if d["output_tokens_per_s"] >= 0.9 * best), key=lambda d: d["batch"])
    out["decode_batch"] = pick["batch"]
    out["decode_tokens_per_s"] = pick["output_tokens_per_s"]
    out["decode_rows_per_s"] = pick["output_tokens_per_s"] / mean_out
    return out


def _request(i: int, prompt: list[int], max_new_tokens: int) -> Request:
    return Request(str(i), list(prompt), SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True))


def decode_rates(lm, work: Workload, prefill, n: int, max_num_seqs: int, kv_budget_bytes: int) -> list[dict]:
    """Median decode step time at batch sizes 1, 2, 4, ..., on mid-generation contexts."""
    from pdbatch.engines.builtin.decode import DecodeEngine
    from pdbatch.kv.packet import KVPacket

    # contexts = prompt + half the output: the middle of each row's decode
    ctx = [list(work.prompts[i]) + list(work.prompts[i][:1]) * (work.out_lens[i] // 2) for i in range(n)]
    packets = [p for p in prefill.run([_request(i, c, 2) for i, c in enumerate(ctx)]) if isinstance(p, KVPacket)]
    params = SamplingParams(max_new_tokens=DECODE_STEPS + WARMUP_STEPS + 2, ignore_eos=True)
    limit = min(max_num_seqs, len(work.prompts))
    sizes = [b for b in (1, 2, 4, 8, 16, 32, 64, 128, 256, 512) if b < limit] + [limit]
    rates = []
    for batch in sizes:
        engine = DecodeEngine(lm, kv_budget_bytes=kv_budget_bytes, max_num_seqs=batch)
        try:
            futs = [engine.submit(dataclasses.replace(packets[i % len(packets)], seq_id=f"c{i}", params=params))
                    for i in range(batch)]
            for f in futs:
                f.result()
        finally:
            engine.close()
        steps = [(k, dt) for k, dt in engine.stats.step_log]
        top = max(k for k, _ in steps)
        full = [dt for k, dt in steps if k == top][WARMUP_STEPS:] or [dt for k, dt in steps if k == top]
        step = statistics.median(full)
        if not rates or top > rates[-1]["batch"]:
            rates.append({"batch": top, "step_s": step, "output_tokens_per_s": top / step})
        if top < batch:  # the KV budget admits no more: larger batches would measure the same
            break
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
