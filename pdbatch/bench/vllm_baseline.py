"""The `vllm` system of `pdbatch bench`: vLLM's own `LLM.generate`, run the way a user would run
it on the same machine, model, prompts and output lengths.

It runs in a child process (`python -m pdbatch.bench.vllm_baseline IN.json OUT.json`): vLLM
replaces torch's thread setting process-wide and reseeds the global RNGs, which would change
every system measured after it in the bench process. The child uses vLLM's default engine (its
engine core in a process of its own, torch.compile on), every core the pdbatch workers share
(VLLM_CPU_OMP_THREADS_BIND), the preloads vLLM's x86 docs ask for, greedy sampling with EOS
ignored and each row's own max_tokens. Start-up (engine build, compile, warm-up) is timed apart
from generation; TTFT and TPOT come from vLLM's per-request stats (its engine core's clock).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


def run_vllm(model: str, work, *, cores: int, dtype: str, max_num_seqs: int, max_batch_tokens: int | None,
             kv_budget_bytes: int, enforce_eager: bool = False, timeout_s: float = 3600) -> dict:
    """vLLM's LLM.generate on `work` (pdbatch.bench.engine.Workload): outputs, wall_s, cpu_s,
    ttft_s per row, token_times [first, last, n] per row, startup_s, version, llm_kwargs."""
    from pdbatch.engines.vllm.settings import cpu_preload, llm_kwargs, require_vllm, resolve_device

    require_vllm()
    device = resolve_device("auto")
    kw = llm_kwargs(model, device=device, dtype=dtype, max_num_seqs=max_num_seqs,
                    max_batch_tokens=max_batch_tokens, kv_budget_bytes=kv_budget_bytes, enforce_eager=enforce_eager)
    kw.update(skip_tokenizer_init=False, disable_log_stats=False)  # per-request stats: TTFT, TPOT
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    if device == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cores - 1}"
        env["OMP_NUM_THREADS"] = str(cores)  # every core, whatever this process's environment says
        preload = cpu_preload()
        if preload:
            env["LD_PRELOAD"] = ":".join(preload)
    with tempfile.TemporaryDirectory(prefix="pdbatch-vllm-bench-") as tmp:
        env.setdefault("VLLM_CACHE_ROOT", os.path.join(tmp, "cache"))
        src, dst = os.path.join(tmp, "in.json"), os.path.join(tmp, "out.json")
        with open(src, "w") as f:
            json.dump({"llm": kw, "prompts": work.prompts, "out_lens": work.out_lens}, f)
        proc = subprocess.run([sys.executable, "-m", "pdbatch.bench.vllm_baseline", src, dst], env=env,
                              timeout=timeout_s, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        if proc.returncode != 0:
            tail = "\n".join(proc.stdout.strip().splitlines()[-15:])
            raise RuntimeError(f"vLLM's LLM.generate failed (exit {proc.returncode}):\n{tail}")
        with open(dst) as f:
            r = json.load(f)
    return {**r, "llm_kwargs": kw}


def _child(src: str, dst: str) -> None:
    import resource

    import vllm
    from vllm import LLM, SamplingParams, TokensPrompt

    with open(src) as f:
        job = json.load(f)
    t0 = time.time()
    llm = LLM(**job["llm"])
    prompts = [TokensPrompt(prompt_token_ids=p) for p in job["prompts"]]
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in job["out_lens"]]
    warm = min(4, len(prompts))  # compiles the shapes a short batch needs before the clock starts
    llm.generate(prompts[:warm], [SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)] * warm,
                 use_tqdm=False)
    startup = time.time() - t0

    def cpu() -> float:  # this process and the engine core's (a child, alive: read from /proc)
        own = resource.getrusage(resource.RUSAGE_SELF)
        total = own.ru_utime + own.ru_stime
        import psutil

        for c in psutil.Process().children(recursive=True):
            try:
                t = c.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total

    c0, t_start = cpu(), time.time()
    outs = llm.generate(prompts, params, use_tqdm=False)
    wall, used = time.time() - t_start, cpu() - c0
    ttft, times = [], []
    for o in outs:
        m = o.metrics
        n = len(o.outputs[0].token_ids)
        # arrival is wall-clock in this process; first/last token are the engine core's clock
        ttft.append(m.arrival_time - t_start + m.first_token_latency)
        times.append([m.first_token_ts, m.last_token_ts, n])
    with open(dst, "w") as f:
        json.dump({"outputs": [list(o.outputs[0].token_ids) for o in outs], "wall_s": wall, "cpu_s": used,
                   "ttft_s": ttft, "token_times": times, "startup_s": round(startup, 3),
                   "version": vllm.__version__}, f)


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
