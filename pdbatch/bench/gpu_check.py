"""GPU check: prove the disaggregated path on one real GPU and measure it.

    python -m pdbatch.bench.gpu_check --out gpu-check/      (or scripts/gpu_check.sh)

1. Correctness: a small job over UCXX with one prefill and one decode worker (sharing the GPU),
   fp32, greedy; every output compared with Hugging Face `generate` on the same GPU.
2. Device-to-device: the decode worker counts KV packets that arrived in host memory; it must
   be zero, and Dask's transfer log must show the bytes moved over UCXX.
3. Figures (bf16, a random-weight ~1B Llama): prefill tokens/s and MFU, decode output tokens/s
   and share of the memory-bandwidth roofline, KV transfer GB/s.
4. The vLLM engine (when vLLM is installed; `--engines builtin` skips it): the same job in bf16
   through pdbatch's KV connector, disaggregated over UCXX, token for token against the vLLM
   engine colocated (vLLM alone, no KV moved), with zero host-staged packets. bf16 because
   vLLM's GPU attention backends whose page layout pdbatch knows (FLASH_ATTN, TRITON_ATTN) do
   not run fp32; a layout it does not know ends the job with UnsupportedPageLayout.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path

# Peak dense bf16 FLOP/s and HBM bandwidth by device name (vendor data sheets, SXM parts).
PEAKS = {"H200": (989e12, 4.8e12), "H100": (989e12, 3.35e12), "A100": (312e12, 2.04e12),
         "L40S": (362e12, 0.864e12)}
MODEL_1B = dict(vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
                num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=4096)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="gpu-check")
    ap.add_argument("--rows", type=int, default=256, help="rows of the bf16 throughput job")
    ap.add_argument("--check-rows", type=int, default=24, help="rows compared with HF generate")
    ap.add_argument("--engines", default="builtin,vllm", help="engines to check (vllm: if installed)")
    args = ap.parse_args(argv)
    import importlib.util

    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device visible", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = out / "llama-1b"
    if not (model_dir / "config.json").exists():
        from pdbatch.toymodels import build_llama

        t = time.time()
        build_llama(model_dir, seed=0, **MODEL_1B)
        print(f"built {model_dir} in {time.time() - t:.0f}s", flush=True)
    result = {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    result["correctness"] = check_correctness(model_dir, out, args.check_rows)
    result["throughput"] = measure(model_dir, out, args.rows, result["device"])
    ok = result["correctness"]["mismatched_rows"] == 0 and result["correctness"]["host_staged_packets"] == 0
    if "vllm" in args.engines.split(","):
        if importlib.util.find_spec("vllm") is None:
            result["vllm"] = {"skipped": "vllm is not installed (pip install -e '.[vllm,ucx-cu13]')"}
        else:
            result["vllm"] = check_vllm(model_dir, out, args.check_rows)
            ok = ok and result["vllm"]["mismatched_rows"] == 0 and result["vllm"]["host_staged_packets"] == 0
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))
    return 0 if ok else 1


def prompts_table(path: Path, n: int, vocab: int, lo: int, hi: int, seed: int = 0):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(seed)
    words = [f"w{rng.randrange(vocab)}" for _ in range(4000)]
    rows = [" ".join(rng.choice(words) for _ in range(rng.randint(lo, hi))) for _ in range(n)]
    pq.write_table(pa.table({"id": [f"r{i:05d}" for i in range(n)], "prompt": rows}), path)
    return rows


def run_job_on_gpu(model_dir: Path, inp: Path, outdir: Path, **options) -> tuple[dict, dict]:
    """Run a job on an embedded GPU cluster; return its report and the workers' engine status."""
    from pdbatch.config import build_config
    from pdbatch.driver.cluster import connect
    from pdbatch.driver.pipeline import Pipeline
    from pdbatch.driver.worker import worker_status
    from pdbatch.io.dataset import plan_input
    from pdbatch.io.output import OutputDir

    cfg = build_config({"input": str(inp), "output": str(outdir), "model": str(model_dir), "overwrite": True,
                        "protocol": "ucxx", "prefill_workers": 1, "decode_workers": 1, "id_column": "id",
                        "progress": "none", **options})
    plan = plan_input(cfg.input, prompt_column="prompt", id_column="id", unit_rows=cfg.unit_rows)
    out = OutputDir(str(outdir))
    done = out.prepare({"input": plan.fingerprint(), **cfg.result_options()}, True)
    with connect(cfg) as (client, protocol, _):
        pipe = Pipeline(cfg, client, plan, out, done, protocol=protocol)
        pipe.register_engines()
        report = pipe.run()
        status = client.run(worker_status)
        transfers = client.run(lambda dask_worker: list(dask_worker.transfer_incoming_log))
    return report, {"status": status, "transfers": transfers}


def check_correctness(model_dir: Path, out: Path, rows: int) -> dict:
    import torch

    from pdbatch.engines.builtin.model import load_model

    inp = out / "check.parquet"
    prompts = prompts_table(inp, rows, 30000, 8, 200, seed=1)
    report, info = run_job_on_gpu(model_dir, inp, out / "check-out", dtype="float32", max_new_tokens=32,
                                  ignore_eos=True, unit_rows=8)
    got = _output_ids(out / "check-out")
    lm = load_model(str(model_dir), dtype="float32", device="cuda")
    mismatched = 0
    for i, prompt in enumerate(prompts):
        ids = torch.tensor([lm.tokenizer(prompt)["input_ids"]], device="cuda")
        ref = lm.model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32,
                                eos_token_id=None, pad_token_id=0)[0, ids.shape[1]:].tolist()
        mismatched += ref != got[f"r{i:05d}"]
    packets, staged = _packet_counts(info)
    ucx_bytes = report["dask_transfer_bytes_this_run"]  # running totals: the logs keep only recent transfers
    del lm
    torch.cuda.empty_cache()
    return {"rows": rows, "mismatched_rows": mismatched, "kv_packets": packets, "host_staged_packets": staged,
            "dask_transfer_bytes": ucx_bytes, "kv_bytes_moved": report["kv_bytes_moved"],
            "protocol": report["protocol"]}


def _output_ids(outdir: Path) -> dict:
    """A job's output token ids by row id."""
    import pyarrow.dataset as ds

    return {r["id"]: r["output_token_ids"] for r in ds.dataset(str(outdir)).to_table().to_pylist()}


def _packet_counts(info: dict) -> tuple[int, int]:
    """KV packets the workers' engines took in, and how many of them arrived in host memory."""
    status = info["status"].values()
    return (sum(s.get("kv_packets", 0) for s in status),
            sum(s.get("kv_packets_host_staged", 0) for s in status))


def check_vllm(model_dir: Path, out: Path, rows: int, dtype: str = "bfloat16") -> dict:
    """vLLM engine: P/D over UCXX against vLLM colocated (same kernels, no KV moved), bf16."""
    inp = out / "check-vllm.parquet"
    prompts_table(inp, rows, 30000, 8, 200, seed=3)
    common = dict(engine="vllm", dtype=dtype, max_new_tokens=32, ignore_eos=True, unit_rows=8,
                  kv_budget="8GiB", rebalance=False)
    t = time.time()
    report, info = run_job_on_gpu(model_dir, inp, out / "check-vllm-pd", **common)
    pd_s = time.time() - t
    colocated, _ = run_job_on_gpu(model_dir, inp, out / "check-vllm-colocated", mode="colocated", **common)

    pd, alone = _output_ids(out / "check-vllm-pd"), _output_ids(out / "check-vllm-colocated")
    packets, staged = _packet_counts(info)
    return {"rows": rows, "mismatched_rows": sum(pd.get(k) != v for k, v in alone.items()),
            "kv_packets": packets, "host_staged_packets": staged,
            "kv_bytes_moved": report["kv_bytes_moved"], "protocol": report["protocol"],
            "dask_transfer_bytes": report["dask_transfer_bytes_this_run"], "pd_job_s": round(pd_s, 1),
            "colocated_rows": colocated["rows"]}


def measure(model_dir: Path, out: Path, rows: int, device: str) -> dict:
    from transformers import AutoConfig

    inp = out / "bench.parquet"
    prompts_table(inp, rows, 30000, 256, 1024, seed=2)
    report, info = run_job_on_gpu(model_dir, inp, out / "bench-out", dtype="bfloat16", max_new_tokens=128,
                                  ignore_eos=True, unit_rows=32, kv_budget="24GiB", max_num_seqs=256)
    cfg = AutoConfig.from_pretrained(model_dir)
    params = sum(_param_counts(cfg))
    st = {k: v for s in info["status"].values() for k, v in s.items()}  # one worker per role
    prefill_tps = st["prefill_tokens"] / st["prefill_busy_s"]
    decode_tps = st["decode_tokens"] / st["decode_busy_s"]
    peak_flops, peak_bw = next((v for k, v in PEAKS.items() if k in device), (None, None))
    # decode reads every weight once per step plus the batch's KV; bf16 = 2 bytes
    steps_per_s = st["decode_steps"] / st["decode_busy_s"]
    avg_batch = st["decode_tokens"] / st["decode_steps"]
    kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 2
    avg_ctx = report["prompt_tokens"] / report["rows"] + 64
    bytes_per_step = params * 2 + avg_batch * avg_ctx * kv_per_token
    bw = [e["bandwidth"] for log in info["transfers"].values() for e in log if e.get("bandwidth")]
    return {
        "params": params, "rows": report["rows"], "prompt_tokens": report["prompt_tokens"],
        "output_tokens": report["output_tokens"], "wall_s": report["wall_s"],
        "prefill_tokens_per_s": prefill_tps,
        "prefill_mfu": (2 * params * prefill_tps / peak_flops) if peak_flops else None,
        "decode_output_tokens_per_s": decode_tps, "decode_avg_batch": avg_batch,
        "decode_bandwidth_share": (bytes_per_step * steps_per_s / peak_bw) if peak_bw else None,
        "kv_transfer_GBps_median": sorted(bw)[len(bw) // 2] / 1e9 if bw else None,
        "ttft_p50_s": report["ttft_p50_s"], "tpot_p50_s": report["tpot_p50_s"], "tpot_p99_s": report["tpot_p99_s"],
    }


def _param_counts(cfg):
    h, i, L = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (h // cfg.num_attention_heads)
    yield L * (2 * h * h + 2 * h * kv + 3 * h * i)  # attention + SwiGLU MLP GEMMs
    yield cfg.vocab_size * h  # lm_head (tied: counted once)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
