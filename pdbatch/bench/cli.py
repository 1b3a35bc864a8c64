"""`pdbatch bench` and `pdbatch plan` (registered on the main command group in pdbatch/cli.py)."""

from __future__ import annotations

import json
import os
import shlex
import sys

import click

from pdbatch.bench.systems import SYSTEMS, check_systems, default_systems
from pdbatch.bench.workloads import PRESETS, WorkloadSpec


def workload_options(f):
    opts = [
        click.option("--workload", default="uniform", show_default=True,
                     help=f"{', '.join(PRESETS)}; any other name with --prompt-len and --output-len."),
        click.option("--rows", type=int, default=64, show_default=True, help="Rows (prompts) in the workload."),
        click.option("--prompt-len", help="Prompt tokens: N (fixed) or A-B (uniform); overrides the workload's."),
        click.option("--output-len", help="Output tokens: N (fixed) or A-B (uniform); overrides the workload's."),
        click.option("--prefix-share", type=float, default=0.0, show_default=True,
                     help="Share of each prompt taken from one shared system prompt, in [0, 1)."),
        click.option("--seed", type=int, default=0, show_default=True, help="Workload seed."),
        click.option("--model", default="tiny", show_default=True,
                     help="tiny (bundled ~1M model), bench-30m (built once into ~/.cache/pdbatch/bench) or a "
                          "Hugging Face model directory."),
        click.option("--max-batch-tokens", type=int,
                     help="Prompt tokens per prefill forward pass (every system; default: pdbatch's, "
                          "1024 on CPU, 8192 on GPU)."),
        click.option("--max-num-seqs", type=int, default=64, show_default=True,
                     help="Most sequences decoded at once per engine (every system)."),
        click.option("--kv-budget", default="1GiB", show_default=True, help="KV cache memory per decode engine."),
        click.option("--dtype", default="auto", show_default=True, help="auto, float32, bfloat16, float16."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def _spec(workload, rows, prompt_len, output_len, prefix_share, seed) -> WorkloadSpec:
    return WorkloadSpec.build(workload, rows, prompt_len, output_len, prefix_share, seed)


def _command() -> str:
    return "pdbatch " + " ".join(map(shlex.quote, sys.argv[1:]))


@click.command()
@click.option("--out", "out", required=True, help="Folder for bench.json, the plots and the pdbatch runs.")
@workload_options
@click.option("--systems", default=None, help=f"Comma-separated systems to run, of {', '.join(SYSTEMS)} [default: "
              "all; vllm only where vLLM is installed].")
@click.option("--engine", default="builtin", show_default=True,
              help="Engine of the pdbatch systems (disaggregated, colocated): builtin or vllm.")
@click.option("--enforce-eager/--no-enforce-eager", default=False, show_default=True,
              help="vLLM (the vllm system, and the pdbatch systems on --engine vllm): run eager, without "
                   "torch.compile (start-up in seconds instead of ~30 s per engine on CPU). The same for every "
                   "system, so all run the same kernels; the default compiles, as vLLM does.")
@click.option("--prefill-workers", type=int, default=1, show_default=True,
              help="Prefill workers of the disaggregated run (colocated gets prefill + decode workers).")
@click.option("--decode-workers", type=int, default=1, show_default=True, help="Decode workers of the disaggregated run.")
@click.option("--threads-per-worker", type=int, default=0, help="Torch threads per worker (default: cores / workers); "
              "the in-process baselines get workers x threads.")
@click.option("--baseline-threads", type=int, default=0, help="Torch threads of the in-process baselines "
              "(default: workers x threads-per-worker, the cores pdbatch uses).")
@click.option("--allow-mismatch", type=float, default=0.0, show_default=True,
              help="Share of rows whose greedy output may differ between systems. Keep 0 in float32; bf16/fp16 "
                   "kernels round differently per batch shape and can flip near-ties.")
@click.option("--unit-rows", type=int, default=0, help="Rows per work unit (default: pdbatch run's, at least 3 units per "
              "worker, at most 128 rows).")
@click.option("--rebalance/--no-rebalance", default=True, show_default=True,
              help="Disaggregated run: move workers between prefill and decode as the work needs (pdbatch's default); "
                   "--no-rebalance keeps the fixed split.")
@click.option("--hf-batch-size", type=int, default=16, show_default=True, help="Static batch size of hf_generate.")
@click.option("--repeat", type=int, default=1, show_default=True,
              help="Rounds of every system, their order alternating (A B, B A, ...); figures are each system's "
                   "median run, and bench.json adds every round and the per-round disaggregated/colocated ratios.")
def bench(out, workload, rows, prompt_len, output_len, prefix_share, seed, systems, **kw):
    """Run one workload through pdbatch (disaggregated and colocated) and the baselines (Hugging
    Face's static-batch `generate` and continuous-batching `generate_batch`, vLLM's own
    `LLM.generate`); check that the
    greedy outputs are equal; write OUT/bench.json, PNG plots and print a table."""
    try:
        import matplotlib  # noqa: F401  (the PNG plots; the `bench` extra)
    except ImportError:
        raise click.ClickException("pdbatch bench needs matplotlib for its plots: "
                                   "pip install 'pdbatch[bench]'") from None
    from pdbatch.bench.compare import BenchOptions, run_bench

    names = check_systems([s.strip() for s in systems.split(",") if s.strip()] if systems else default_systems())
    opts = BenchOptions(spec=_spec(workload, rows, prompt_len, output_len, prefix_share, seed), out=out,
                        systems=tuple(names), **kw)
    for name in ("prefill_workers", "decode_workers"):
        if getattr(opts, name) < 1:
            raise click.BadParameter(f"must be >= 1, got {getattr(opts, name)}", param_hint=f"--{name.replace('_', '-')}")
    if opts.repeat < 1:
        raise click.BadParameter(f"must be >= 1, got {opts.repeat}", param_hint="--repeat")
    if not 0 <= opts.allow_mismatch <= 1:
        raise click.BadParameter(f"must be in [0, 1], got {opts.allow_mismatch}", param_hint="--allow-mismatch")
    rc, _ = run_bench(opts, echo=lambda m: click.echo(m), command=_command())
    return rc


@click.command()
@workload_options
@click.option("--workers", type=int, default=0, help="Total workers to split (default: cores / threads-per-worker, at least 2).")
@click.option("--threads-per-worker", type=int, default=1, show_default=True, help="Torch threads of one worker.")
@click.option("--sample-rows", type=int, default=16, show_default=True, help="Rows used to measure prefill.")
@click.option("--engine", default="builtin", show_default=True, help="Engine to calibrate: builtin or vllm.")
@click.option("--enforce-eager/--no-enforce-eager", default=False, show_default=True,
              help="vLLM: run eager, without torch.compile (the default compiles, as vLLM and pdbatch bench do).")
@click.option("--json", "json_path", help="Also write the measurements and the recommendation to this file.")
def plan(workload, rows, prompt_len, output_len, prefix_share, seed, model, max_batch_tokens, max_num_seqs,
         kv_budget, dtype, device, workers, threads_per_worker, sample_rows, engine, enforce_eager, json_path):
    """Measure one worker's prefill and decode rates of an engine for a model and workload, and
    recommend the prefill:decode worker ratio (and decode batch size) that balances the two stages.
    Confirm it with `pdbatch bench --prefill-workers P --decode-workers D`."""
    from pdbatch.bench.compare import resolve_model
    from pdbatch.bench.plan import calibrate, default_workers, plan_lines, recommend
    from pdbatch.bench.workloads import make_workload, token_pool
    from pdbatch.config import build_config
    from pdbatch.engines import ENGINES, engine_class
    from pdbatch.engines.model_dir import context_length, load_config_and_tokenizer, vocab_size

    if engine not in ENGINES:
        raise click.BadParameter(f"must be one of {', '.join(ENGINES)}, got {engine!r}", param_hint="--engine")
    spec = _spec(workload, rows, prompt_len, output_len, prefix_share, seed)
    label, path = resolve_model(model)
    # the workload needs the vocabulary and the context, not the weights: the engine being
    # calibrated loads those (and says itself whether it can run the model)
    config, tokenizer = load_config_and_tokenizer(path)
    spec.check_fits(context_length(config))
    work = make_workload(spec, token_pool(tokenizer, vocab_size(config)))
    workers = workers or default_workers(threads_per_worker)
    job = build_config({"input": "-", "output": "-", "model": path, "engine": engine, "dtype": dtype, "device": device,
                        "max_num_seqs": max_num_seqs, "max_batch_tokens": max_batch_tokens, "kv_budget": kv_budget,
                        "enforce_eager": enforce_eager}, None)
    # what a worker's EngineHost hands its engine (driver/worker.py); KV moves, as in a P/D job
    options = {**job.engine_options(), "engine": engine, "dtype": dtype, "mode": job.mode,
               "threads": threads_per_worker, "enforce_eager": enforce_eager}
    engine_class(engine).check_options(options)
    click.echo(f"pdbatch plan: workload {spec.name}, model {label}, engine {engine}, {workers} workers x "
               f"{threads_per_worker} thread(s), {os.cpu_count()} cores, load {os.getloadavg()[0]:.2f}")
    cal = calibrate(options, work, sample_rows=sample_rows)
    rec = recommend(cal, workers)
    for line in plan_lines(cal, rec):
        click.echo(line)
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"command": _command(), "workload": spec.to_dict(), "model": {"name": label, "path": path},
                       "calibration": cal, "recommendation": rec}, f, indent=1)
    return 0
