"""Engine benchmark: pdbatch's prefill + decode engines against Hugging Face `generate()` and
transformers' own continuous batching, in one process, plus a roofline check of the decode step.

    python -m pdbatch.bench.engine [--prompts 200] [--threads 1] [--out FILE.json]
        [--systems pdbatch,pdbatch_sequential,hf_generate,generate_batch] [--seed 0]

Workload: prompts of 32-512 random token ids (ids >= 3, so no special tokens), output lengths
16-256 with EOS ignored, so every row generates exactly its own length; the random-weight
~30M-parameter Llama of `pdbatch.toymodels` (BENCH_LLAMA_30M) in fp32. All systems get the same
weights and prompts: pdbatch's engines the model as pdbatch loads it (CPU-tuned weight layout
and decode attention, `pdbatch.engines.builtin.model.tune_for_cpu`), the Hugging Face systems
the model exactly as transformers loads it. Throughput = useful output tokens / wall time, prefill
included. Greedy outputs are compared row by row with hf_generate's, and a few rows with
one-prompt-at-a-time `generate()` (batching with padding can flip near-ties in rare rows).

Systems:
  pdbatch             pdbatch.engines.builtin.decode.generate(colocated=True): prefill batches
                      interleaved with continuous-batching decode steps in one engine
  pdbatch_sequential  colocated=False: prefill everything, then decode
  hf_generate         model.generate, static batches of 16 prompts sorted by length, left padded;
                      a batch runs to its longest output, only each row's own length counts
  generate_batch      transformers' continuous batching (init_continuous_batching + add_request
                      with per-request max_new_tokens), same token and KV budgets as pdbatch.
                      It runs on CPU with the model's "sdpa" attention; its other CPU choice,
                      "paged|eager", took 1.5x the CPU time on 20 prompts.

Roofline: R = single-thread fp32 GEMM rate of torch.matmul [B, hidden] x [hidden, intermediate]
(1024^3 reported beside it), P = weights of the Linear layers (lm_head included, a tied
embedding counted once), and DecodeEngine's step with exactly B rows of C-token context is
compared with the GEMM time B x 2 x P / R, for B in 32, 64, 128 and C in 32, 128, 256 (the
workload's contexts run from 32 to ~770). Beside each step: the model's own GEMMs run back to
back at that batch with nothing else (what the step's weight FLOPs cost here in practice), and
the time to read the step's KV cache once at the measured memory bandwidth, which the compute
roofline leaves out and which grows with C.

Shared machines: other jobs stretch wall time, so every figure also comes as CPU time (of the
process for the systems, of the working thread for the GEMM rates and decode steps). The
throughput ratios are given both ways; the roofline uses CPU time on both sides.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shlex
import statistics
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers
from transformers import ContinuousBatchingConfig, GenerationConfig

from pdbatch.config import JobConfig, parse_size
from pdbatch.engines.builtin.decode import DecodeEngine, generate, kv_bytes_per_token, kv_shape
from pdbatch.engines.builtin.model import LoadedModel, load_model
from pdbatch.engines.builtin.prefill import default_max_batch_tokens
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams
from pdbatch.kv.packet import KVPacket
from pdbatch.toymodels import BENCH_LLAMA_30M, build_llama

SYSTEMS = ("pdbatch", "pdbatch_sequential", "hf_generate", "generate_batch")
HF_SYSTEMS = ("hf_generate", "generate_batch")  # run on the model as transformers loads it
PROMPT_LEN = (32, 512)
OUTPUT_LEN = (16, 256)
FIRST_ID = 3  # ids 0-2 are pad/bos/eos in the toy tokenizer


@dataclass
class Workload:
    prompts: list[list[int]]
    out_lens: list[int]

    @property
    def output_tokens(self) -> int:
        return sum(self.out_lens)


def make_workload(n: int, seed: int, vocab_size: int) -> Workload:
    rng = random.Random(seed)
    prompts, out_lens = [], []
    for _ in range(n):
        prompts.append([rng.randrange(FIRST_ID, vocab_size) for _ in range(rng.randint(*PROMPT_LEN))])
        out_lens.append(rng.randint(*OUTPUT_LEN))
    return Workload(prompts, out_lens)


def model_dir(arg: str | None) -> Path:
    """The benchmark model, built once per torch/transformers version (the weights depend on them)."""
    if arg:
        path = Path(arg)
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "pdbatch" / "bench"
        path = cache / f"llama-30m-seed0-torch{torch.__version__}-tf{transformers.__version__}"
    if not (path / "config.json").is_file():
        # build next to the target and rename, so an interrupted build is never reused
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=path.name + ".tmp-", dir=path.parent))
        build_llama(tmp, seed=0, **BENCH_LLAMA_30M)
        tmp.rename(path)
    return path


# --- the systems: each returns the generated ids per row, in workload order ----------------

def run_pdbatch(lm: LoadedModel, work: Workload, args, colocated: bool = True) -> list[list[int]]:
    reqs = [Request(str(i), p, SamplingParams(max_new_tokens=k, ignore_eos=True))
            for i, (p, k) in enumerate(zip(work.prompts, work.out_lens))]
    outs = generate(lm, reqs, colocated=colocated, max_batch_tokens=args.max_batch_tokens,
                    kv_budget_bytes=args.kv_budget_mib << 20, max_num_seqs=args.max_num_seqs)
    failed = [o for o in outs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} rows failed, first: {failed[0].error}")
    return [o.output_token_ids for o in outs]


def run_pdbatch_sequential(lm, work, args):
    return run_pdbatch(lm, work, args, colocated=False)


@contextmanager
def eos_disabled(model):
    """generate() fills every None field of the GenerationConfig it is given from
    model.generation_config, so eos_token_id=None alone would still stop at the model's EOS."""
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = None
    try:
        yield
    finally:
        model.generation_config.eos_token_id = saved


def hf_generate_batch(lm: LoadedModel, prompts: list[list[int]], max_new_tokens: int) -> torch.Tensor:
    """Greedy model.generate on left-padded prompts; returns only the generated ids [B, max_new_tokens]."""
    pad = lm.tokenizer.pad_token_id or 0
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), pad, dtype=torch.long)
    mask = torch.zeros(len(prompts), T, dtype=torch.long)
    for b, p in enumerate(prompts):
        ids[b, T - len(p):] = torch.tensor(p)
        mask[b, T - len(p):] = 1
    cfg = GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None, pad_token_id=pad)
    with eos_disabled(lm.model):
        out = lm.model.generate(input_ids=ids, attention_mask=mask, generation_config=cfg)
    return out[:, T:]


def run_hf_generate(lm, work, args):
    # Sorting by prompt length keeps padding small, as a careful user would; output lengths are
    # unknown to a real user, so a batch decodes until its longest row is done.
    order = sorted(range(len(work.prompts)), key=lambda i: len(work.prompts[i]))
    outs: list = [None] * len(order)
    for s in range(0, len(order), args.hf_batch_size):
        idx = order[s:s + args.hf_batch_size]
        gen = hf_generate_batch(lm, [work.prompts[i] for i in idx], max(work.out_lens[i] for i in idx))
        for b, i in enumerate(idx):
            outs[i] = gen[b, :work.out_lens[i]].tolist()
    return outs


def run_generate_batch(lm, work, args):
    block_bytes = 256 * kv_bytes_per_token(lm)  # 256-token pages
    # Same budgets as pdbatch: tokens per forward pass, sequences per batch, KV memory. Without
    # num_blocks the paged cache would take 60% of the machine's RAM (and zero it).
    cb_cfg = ContinuousBatchingConfig(max_batch_tokens=args.max_batch_tokens,
                                      max_requests_per_batch=args.max_num_seqs,
                                      num_blocks=(args.kv_budget_mib << 20) // block_bytes)
    gen_cfg = GenerationConfig(do_sample=False, max_new_tokens=max(OUTPUT_LEN), eos_token_id=-1,  # -1: no EOS
                               pad_token_id=lm.tokenizer.pad_token_id or 0)
    manager = lm.model.init_continuous_batching(generation_config=gen_cfg, continuous_batching_config=cb_cfg)
    manager.start()
    try:
        for i, (p, k) in enumerate(zip(work.prompts, work.out_lens)):
            manager.add_request(p, request_id=str(i), max_new_tokens=k)
        done: dict[str, list[int]] = {}
        while len(done) < len(work.prompts):
            # a short timeout, so a crashed generation thread is noticed (rows can take minutes)
            r = manager.get_result(timeout=1)
            if r is None:
                if not manager.is_running():
                    raise RuntimeError(f"generate_batch: generation thread stopped ({len(done)} rows done)")
                continue
            if r.error:
                raise RuntimeError(f"generate_batch: request {r.request_id} failed: {r.error}")
            if r.is_finished():
                done[r.request_id] = list(r.generated_tokens)
    finally:
        manager.stop(block=True)
    return [done[str(i)] for i in range(len(work.prompts))]


RUNNERS = {"pdbatch": run_pdbatch, "pdbatch_sequential": run_pdbatch_sequential,
           "hf_generate": run_hf_generate, "generate_batch": run_generate_batch}


def timed(fn, lm, work, args) -> tuple[list[list[int]], float, float]:
    """Outputs, wall seconds and CPU seconds of this process. On a shared machine other jobs
    stretch the wall time much more than the CPU time (all threads; a waiting thread uses none)."""
    t0, c0 = time.perf_counter(), time.process_time()
    outs = fn(lm, work, args)
    return outs, time.perf_counter() - t0, time.process_time() - c0


def mismatches(outs, ref: dict[int, list[int]]) -> list[int]:
    return [i for i, want in ref.items() if outs[i] != want]


# --- roofline -----------------------------------------------------------------------------

def best_rate(fn, work: float, seconds: float = 0.3, rounds: int = 3) -> float:
    """`work` units per CPU second of fn(), best of `rounds` loops. CPU time of this thread, not
    wall time: on a shared machine other jobs take turns on the core, which stretches wall time
    but not the time this thread actually ran."""
    for _ in range(3):
        fn()
    best = 0.0
    for _ in range(rounds):
        reps, t0 = 0, time.thread_time()
        while (dt := time.thread_time() - t0) < seconds:
            fn()
            reps += 1
        best = max(best, work * reps / dt)
    return best


def gemm_gflops(m: int, k: int, n: int) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    return best_rate(lambda: torch.matmul(a, b), 2 * m * k * n / 1e9, rounds=5)


def linear_gflops(m: int, k: int, n: int) -> float:
    """The same GEMM as nn.Linear runs it: x @ W.T with W stored [out, in]."""
    x, w = torch.randn(m, k), torch.randn(n, k)
    return best_rate(lambda: torch.nn.functional.linear(x, w), 2 * m * k * n / 1e9)


def read_gbps(nbytes: int = 256 << 20) -> float:
    """Memory read bandwidth of one core: summing a tensor far larger than the caches."""
    t = torch.ones(nbytes // 4)
    return best_rate(t.sum, nbytes / 1e9, rounds=2)


def gemm_params(model: torch.nn.Module) -> int:
    """Weights of all Linear layers; a tied lm_head shares its tensor with the embedding and is
    counted once here (the embedding itself is a lookup, not a GEMM)."""
    seen = {}
    for mod in model.modules():
        if isinstance(mod, torch.nn.Linear):
            seen[mod.weight.data_ptr()] = mod.weight.numel()
    return sum(seen.values())


def decode_steps(lm: LoadedModel, batch: int, prompt_len: int = 256, steps: int = 20) -> tuple[list, list]:
    """Wall and CPU seconds of `steps` DecodeEngine steps with exactly `batch` sequences of
    ~prompt_len context.

    The KV packets carry random values instead of a real prefill (step time does not depend on
    them, and it saves minutes); they share one tensor, since admission copies it anyway."""
    layers, kv_heads, head_dim = kv_shape(lm)
    kv = torch.randn(layers, 2, kv_heads, prompt_len, head_dim, dtype=lm.dtype)
    # Budget for `batch` rows even if the slot pool grows its length axis to the whole context
    # (it does, by doubling), so that exactly `batch` rows are admitted.
    budget = batch * lm.max_model_len * kv_bytes_per_token(lm)
    engine = DecodeEngine(lm, kv_budget_bytes=budget, max_num_seqs=batch)
    # stats.step_log has wall times; the engine thread's CPU time per step is measured by
    # wrapping its _step (the loop calls self._step, so an instance attribute takes over).
    cpu_log, step = [], engine._step

    def timed_step():
        n, c0 = len(engine.active), time.thread_time()
        step()
        cpu_log.append((n, time.thread_time() - c0))

    engine._step = timed_step
    warmup, now = 2, time.time()
    # A few extra tokens per row: the engine may start stepping before the last packet arrives,
    # so the first rows can finish a step or two early; only steps at the full batch count.
    params = SamplingParams(max_new_tokens=steps + warmup + 4, ignore_eos=True)
    futs = [engine.submit(KVPacket(seq_id=str(i), prompt_ids=[FIRST_ID] * prompt_len, first_token=FIRST_ID + i,
                                   kv=kv, fingerprint=lm.fingerprint, params=params, arrival_time=now,
                                   first_token_time=now))
            for i in range(batch)]
    try:
        for f in futs:
            f.result()
    finally:
        engine.close()
    full = slice(warmup, warmup + steps)
    if not any(n == batch for n, _ in cpu_log):
        raise RuntimeError(f"the decode engine never ran {batch} rows at once: {sorted({n for n, _ in cpu_log})}")
    return ([dt for n, dt in engine.stats.step_log if n == batch][full],
            [dt for n, dt in cpu_log if n == batch][full])


def gemm_chain_s(lm: LoadedModel, batch: int, reps: int = 15) -> float:
    """CPU seconds of one decode step's GEMMs alone: every Linear of the model, in order, on a
    [batch, in] input, with the weights as the engine holds them. Median of `reps`."""
    weights = [m.weight for m in lm.model.modules() if isinstance(m, torch.nn.Linear)]
    inputs = {w.shape[1]: torch.randn(batch, w.shape[1], dtype=lm.dtype) for w in weights}

    def chain():
        for w in weights:
            torch.nn.functional.linear(inputs[w.shape[1]], w)

    with torch.inference_mode():
        for _ in range(3):
            chain()
        times = []
        for _ in range(reps):
            t0 = time.thread_time()
            chain()
            times.append(time.thread_time() - t0)
    return statistics.median(times)


def roofline(lm: LoadedModel, batches=(32, 64, 128), contexts=(32, 128, 256)) -> dict:
    cfg = lm.model.config
    h, inter = cfg.hidden_size, cfg.intermediate_size
    P = gemm_params(lm.model)
    out = {"gemm_params": P, "gflops_1024": gemm_gflops(1024, 1024, 1024), "read_gbps": read_gbps(),
           "batches": {}}
    for B in batches:
        # The decode step's MLP up/gate GEMM at this batch. Measured before and after the steps
        # and the faster kept: a rate caught in a slow moment of a shared machine would lower the
        # floor and flatter the ratio.
        rate = gemm_gflops(B, h, inter)
        b = out["batches"][B] = {
            "gemm_shape": [B, h, inter], "linear_gflops": linear_gflops(B, h, inter),
            "gemm_chain_s": gemm_chain_s(lm, B), "contexts": {}}
        steps = {C: decode_steps(lm, B, C) for C in contexts}
        rate = b["gflops"] = max(rate, gemm_gflops(B, h, inter))
        floor = b["gemm_floor_s"] = B * 2 * P / (rate * 1e9)
        for C in contexts:
            wall, cpu = steps[C]
            step = statistics.median(cpu)  # CPU time, like the GEMM rate; wall time reported beside it
            # C + 12: the mean context over the measured steps
            kv_bytes = B * (C + 12) * kv_bytes_per_token(lm)
            b["contexts"][C] = {
                "step_s": step, "step_min_s": min(cpu), "step_wall_s": statistics.median(wall),
                "steps": len(cpu), "ratio": step / floor,
                "ratio_vs_1024": step / (B * 2 * P / (out["gflops_1024"] * 1e9)),
                "kv_read_floor_s": kv_bytes / (out["read_gbps"] * 1e9)}
    return out


# --- main -----------------------------------------------------------------------------------

def int_list(text: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def parse_args(argv=None):
    ap = argparse.ArgumentParser(prog="python -m pdbatch.bench.engine", description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=200)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    ap.add_argument("--out", default="bench-engine.json", help="JSON file for the figures")
    ap.add_argument("--systems", default=",".join(SYSTEMS))
    ap.add_argument("--seed", type=int, default=0, help="workload seed")
    ap.add_argument("--max-batch-tokens", type=int,
                    help="prefill tokens per forward pass, pdbatch and generate_batch (default: pdbatch's "
                         "CPU default, 1024)")
    ap.add_argument("--max-num-seqs", type=int, default=JobConfig.max_num_seqs,
                    help="decode batch size limit, pdbatch and generate_batch (default: pdbatch's, 128)")
    # pdbatch's default KV budget, 2 GiB: 128 rows of up to 768 positions take 1.5 GiB
    ap.add_argument("--kv-budget-mib", type=int, default=parse_size(JobConfig.kv_budget) >> 20,
                    help="KV memory for pdbatch and generate_batch (default: pdbatch's, 2048)")
    ap.add_argument("--hf-batch-size", type=int, default=16)
    ap.add_argument("--check-rows", type=int, help="rows also run one prompt at a time "
                    "(default: a quarter of the prompts, at most 10)")
    ap.add_argument("--no-roofline", action="store_true")
    ap.add_argument("--roofline-batches", type=int_list, default=[32, 64, 128],
                    help="decode batch sizes timed against the roofline (default 32,64,128)")
    ap.add_argument("--roofline-contexts", type=int_list, default=[32, 128, 256],
                    help="context lengths of those decode steps (default 32,128,256)")
    ap.add_argument("--model-dir", help="default: built once under ~/.cache/pdbatch/bench")
    args = ap.parse_args(argv)
    if args.check_rows is None:
        args.check_rows = min(10, max(1, args.prompts // 4))
    args.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        ap.error(f"unknown system(s) {sorted(unknown)}; choose from {', '.join(SYSTEMS)}")
    return args


def ratio(a, b):
    return a / b if a and b else None


def main(argv=None) -> int:
    args = parse_args(argv)
    command = "python -m pdbatch.bench.engine " + " ".join(map(shlex.quote, sys.argv[1:] if argv is None else argv))
    torch.set_num_threads(args.threads)  # also applies to the engines' background threads
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # "eos_token_id not set" and similar notices are expected here

    path = model_dir(args.model_dir)
    lm = load_model(str(path), dtype="float32", device="cpu")  # pdbatch's engines, CPU-tuned
    plain = load_model(str(path), dtype="float32", device="cpu", tuned=False)  # as transformers loads it
    model_for = {name: plain if name in HF_SYSTEMS else lm for name in SYSTEMS}
    args.max_batch_tokens = args.max_batch_tokens or default_max_batch_tokens(lm.device)
    work = make_workload(args.prompts, args.seed, lm.model.config.vocab_size)
    print(f"{command}\nmodel {path} ({gemm_params(lm.model) / 1e6:.1f}M GEMM params), {args.prompts} prompts "
          f"({sum(map(len, work.prompts))} prompt / {work.output_tokens} output tokens), "
          f"{args.threads} thread(s), {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}", flush=True)

    # Untimed warm-up of every system on a tiny workload (first-call allocations, kernel choice).
    tiny = Workload([p[:40] for p in work.prompts[:2]], [3, 2])
    for name in args.systems:
        RUNNERS[name](model_for[name], tiny, args)

    results, outputs = {}, {}
    for name in args.systems:
        load_before = os.getloadavg()[0]
        outs, wall, cpu = timed(RUNNERS[name], model_for[name], work, args)
        outputs[name] = outs
        results[name] = {"wall_s": wall, "cpu_s": cpu, "output_tokens": work.output_tokens,
                         "tokens_per_s": work.output_tokens / wall, "tokens_per_cpu_s": work.output_tokens / cpu,
                         "wrong_length_rows": sum(len(o) != k for o, k in zip(outs, work.out_lens)),
                         "load_average": [load_before, os.getloadavg()[0]]}
        print(f"  {name:<19} {wall:8.1f} s  {work.output_tokens / wall:8.1f} tok/s  (CPU {cpu:.1f} s)", flush=True)

    # Correctness: every row against hf_generate, a few rows against one-at-a-time generate().
    rows = list(range(0, args.prompts, max(1, args.prompts // max(1, args.check_rows))))[:args.check_rows]
    single = {i: hf_generate_batch(plain, [work.prompts[i]], work.out_lens[i])[0].tolist()
              for i in (rows if outputs else [])}
    hf = dict(enumerate(outputs["hf_generate"])) if "hf_generate" in outputs else None
    for name, outs in outputs.items():
        results[name]["mismatch_vs_single"] = mismatches(outs, single)
        if hf is not None:
            results[name]["mismatch_vs_hf"] = mismatches(outs, hf)

    roof = None if args.no_roofline else roofline(lm, args.roofline_batches, args.roofline_contexts)

    ratios = {}
    for key in ("tokens_per_s", "tokens_per_cpu_s"):
        tps = {n: r[key] for n, r in results.items()}
        suffix = "" if key == "tokens_per_s" else "_cpu"
        ratios[f"pdbatch_over_hf_generate{suffix}"] = ratio(tps.get("pdbatch"), tps.get("hf_generate"))
        ratios[f"pdbatch_over_generate_batch{suffix}"] = ratio(tps.get("pdbatch"), tps.get("generate_batch"))
    if roof:
        for B, b in roof["batches"].items():
            for C, c in b["contexts"].items():
                ratios[f"decode_step_over_roofline_b{B}_ctx{C}"] = c["ratio"]
    print_report(command, results, roof, ratios, rows)

    report = {"command": command, "args": vars(args), "model_dir": str(path),
              "torch": torch.__version__, "transformers": transformers.__version__, "cpus": os.cpu_count(),
              "load_average_end": os.getloadavg(), "prompt_tokens": sum(map(len, work.prompts)),
              "output_tokens": work.output_tokens, "check_rows": rows, "systems": results,
              "roofline": roof, "ratios": ratios}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.out}")
    return 0


def print_report(command, results, roof, ratios, rows) -> None:
    print(f"\n{'system':<19} {'wall s':>7} {'CPU s':>7} {'out tok':>8} {'tok/s':>7} {'tok/CPU-s':>9} "
          f"{'rows != hf':>10} {'!= single':>9}   (single: {len(rows)} rows run one at a time)")
    for name, r in results.items():
        vs_hf = len(r["mismatch_vs_hf"]) if "mismatch_vs_hf" in r else "-"
        print(f"{name:<19} {r['wall_s']:7.1f} {r['cpu_s']:7.1f} {r['output_tokens']:8d} {r['tokens_per_s']:7.1f} "
              f"{r['tokens_per_cpu_s']:9.1f} {vs_hf:>10} {len(r['mismatch_vs_single']):>9}")
    if roof:
        print(f"\nroofline: P = {roof['gemm_params'] / 1e6:.2f}M GEMM params; fp32 matmul 1024^3: "
              f"{roof['gflops_1024']:.1f} GFLOP/s; memory read {roof['read_gbps']:.1f} GB/s")
        print(f"  {'batch':>5} {'R GFLOP/s':>9} {'floor ms':>8} {'GEMMs ms':>8} | {'ctx':>4} {'step ms':>7} "
              f"{'ratio':>5} {'KV read ms':>10}   (floor = B x 2P / R; GEMMs = the step's GEMMs alone)")
        for B, b in roof["batches"].items():
            for i, (C, c) in enumerate(b["contexts"].items()):
                head = (f"  {B:>5} {b['gflops']:>9.1f} {b['gemm_floor_s'] * 1e3:>8.1f} {b['gemm_chain_s'] * 1e3:>8.1f}"
                        if i == 0 else " " * 34)
                print(f"{head} | {C:>4} {c['step_s'] * 1e3:>7.1f} {c['ratio']:>5.2f} {c['kv_read_floor_s'] * 1e3:>10.1f}")
    targets = {"pdbatch_over_hf_generate": ">= 3", "pdbatch_over_generate_batch": ">= 1.5"}
    print()
    for key, val in ratios.items():
        want = targets.get(key.removesuffix("_cpu"), "<= 2")
        note = "  (CPU time, for a shared machine)" if key.endswith("_cpu") else ""
        print(f"{key:<36} {'n/a' if val is None else f'{val:.2f}':>6}   target {want}{note}")
    print(f"command: {command}")


if __name__ == "__main__":
    sys.exit(main())
