"""`pdbatch run` end to end on a real local Dask cluster of separate worker processes."""

from __future__ import annotations

import concurrent.futures
import glob
import os
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from malloc_probe import big_buffer_faults
from pipeline_helpers import (DEFAULT_MODEL, PDBATCH, REPO, SAMPLE, assert_sample_matches_hf, manifest_units,
                              read_report, read_rows, run_cli, run_clis, text_reference, wait_session_empty)

from pdbatch.driver.cluster import scheduler_identity
from pdbatch.engines.builtin.model import load_model

NEW = 24  # tokens per row in these tests: enough to check decode, quick on 2 cores


@pytest.fixture(scope="module")
def tiny():
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def sample_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "sample"
    res = run_cli("run", SAMPLE, "-o", out, "--max-new-tokens", NEW, "--unit-rows", 16, "--id-column", "id")
    assert res.returncode == 0, res.stderr
    return out, res


def reference(tiny, prompt: str, n: int = NEW) -> list[int]:
    return text_reference(tiny, prompt, n)


def test_sample_job_matches_hf_generate(sample_run, tiny):
    out, res = sample_run
    rows = assert_sample_matches_hf(out, tiny, NEW)
    for r in rows:
        assert r["num_generated_tokens"] == len(r["output_token_ids"])
        assert r["generated_text"] == tiny.tokenizer.decode(r["output_token_ids"], skip_special_tokens=True)
        assert r["finish_reason"] in ("stop", "length") and r["ttft_s"] > 0
    assert (out / "_SUCCESS").exists()
    report = read_report(out)
    assert report["rows"] == report["rows_expected"] == len(rows)
    assert report["output_tokens"] == sum(r["num_generated_tokens"] for r in rows)
    assert report["mode"] == "disaggregated" and report["workers"] == {"prefill": 1, "decode": 1}
    for key in ("ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "output_tokens_per_s"):
        assert report[key] > 0
    assert "TTFT" in res.stderr and "Traceback" not in res.stderr


def test_kv_bytes_moved_match_packet_sizes(sample_run, tiny):
    out, _ = sample_run
    rows = read_rows(out)
    cfg = tiny.model.config
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    # rebalancing (the default) decodes some units where they were prefilled: no KV moves for them
    moved = [r for r in rows if r["decode_worker"] is not None and r["prefill_worker"] != r["decode_worker"]]
    expected = sum(r["num_prompt_tokens"] for r in moved) * per_token
    report = read_report(out)
    assert report["kv_bytes_moved"] == expected
    # what Dask itself counted on the wire covers the packets (plus small headers)
    assert expected <= report["dask_transfer_bytes_this_run"] <= expected * 1.2 + 200_000


def test_colocated_and_ucxx_give_identical_outputs(sample_run, tmp_path):
    base = {r["id"]: r["output_token_ids"] for r in read_rows(sample_run[0])}
    co, ux = tmp_path / "colocated", tmp_path / "ucxx"
    common = ["--max-new-tokens", NEW, "--unit-rows", 16, "--id-column", "id"]
    res_co, res_ux = run_clis(["run", SAMPLE, "-o", co, *common, "--mode", "colocated"],
                              # a fixed split, so that every row's KV crosses the ucxx wire
                              ["run", SAMPLE, "-o", ux, *common, "--protocol", "ucxx", "--no-rebalance"])
    assert res_co.returncode == 0, res_co.stderr
    rows = read_rows(co)
    assert {r["id"]: r["output_token_ids"] for r in rows} == base
    assert read_report(co)["kv_bytes_moved"] == 0
    assert all(r["prefill_worker"] == r["decode_worker"] for r in rows)
    assert res_ux.returncode == 0, res_ux.stderr
    assert {r["id"]: r["output_token_ids"] for r in read_rows(ux)} == base
    report = read_report(ux)
    assert report["protocol"] == "ucxx" and report["kv_bytes_moved"] > 0
    assert all(r["prefill_worker"] != r["decode_worker"] for r in read_rows(ux) if r["decode_worker"])


def test_input_layouts(tmp_path, tiny):
    src = pq.read_table(SAMPLE).slice(0, 20)
    prompts = src.column("prompt").to_pylist()
    prompts[3] = "Ünïcødé ✓ 日本語のテキスト 🚀 — résumé"
    shards = tmp_path / "shards"
    shards.mkdir()
    # shard 0: large_string, two row groups; shard 1: dictionary-encoded; shard 2: plain string
    pq.write_table(pa.table({"prompt": pa.array(prompts[:8], pa.large_string())}), shards / "a.parquet",
                   row_group_size=3)
    pq.write_table(pa.table({"prompt": pa.array(prompts[8:14]).dictionary_encode()}), shards / "b.parquet")
    pq.write_table(pa.table({"prompt": pa.array(prompts[14:])}), shards / "c.parquet")
    (shards / "_ignored.txt").write_text("bookkeeping files starting with _ are skipped")
    expected = {}
    for name, lo, hi in (("a.parquet", 0, 8), ("b.parquet", 8, 14), ("c.parquet", 14, 20)):
        for i in range(hi - lo):
            expected[f"{name}:{i}"] = reference(tiny, prompts[lo + i], 8)
    inputs = {"dir": shards, "glob": str(shards / "*.parquet")}
    results = run_clis(*(["run", inp, "-o", tmp_path / f"out-{label}", "--max-new-tokens", 8, "--unit-rows", 4]
                         for label, inp in inputs.items()))
    for label, res in zip(inputs, results):
        out = tmp_path / f"out-{label}"
        assert res.returncode == 0, res.stderr
        rows = read_rows(out)
        assert {r["id"]: r["output_token_ids"] for r in rows} == expected
        assert read_report(out)["units"] == 7  # a: 3 row groups (3+3+2 rows), b: 2 units, c: 2


def test_user_errors_exit_2_with_one_line(tmp_path):
    (tmp_path / "not.parquet").write_text("hello")
    good = tmp_path / "ok.parquet"
    pq.write_table(pa.table({"text": ["a"]}), good)
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "precious.txt").write_text("keep me")
    nomodel = tmp_path / "empty-model"
    nomodel.mkdir()
    cases = [
        (["run", tmp_path / "missing.parquet", "-o", tmp_path / "o1"], "input not found"),
        (["run", tmp_path / "not.parquet", "-o", tmp_path / "o2"], "not a readable Parquet"),
        (["run", good, "-o", tmp_path / "o3"], "prompt column 'prompt' not found"),
        (["run", SAMPLE, "-o", tmp_path / "o4", "--mode", "sideways"], "--mode must be one of"),
        (["run", SAMPLE, "-o", tmp_path / "o5", "--model", nomodel], "not a Hugging Face model directory"),
        (["run", SAMPLE, "-o", occupied], "not empty"),
        (["run", SAMPLE, "-o", tmp_path / "o6", "--temperature", "-1"], "temperature"),
        (["run", SAMPLE, "-o", tmp_path / "o7", "--no-such-option"], "No such option"),
        (["run", SAMPLE, "-o", tmp_path / "o8", "--config", tmp_path / "nope.toml"], "job file not found"),
    ]
    for (args, needle), res in zip(cases, run_clis(*(args for args, _ in cases), timeout=180)):
        assert res.returncode == 2, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], (args, res.stderr)
    assert (occupied / "precious.txt").read_text() == "keep me"


def test_bad_rows_become_error_rows(tmp_path, tiny):
    ctx = tiny.max_model_len
    prompts = ["A normal prompt.", None, "", "   ", "word " * (ctx + 10), "Another fine prompt."]
    inp = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"id": [f"row{i}" for i in range(len(prompts))], "prompt": prompts,
                             "temperature": [0.0, None, 0.0, 0.0, 0.0, None],
                             "max_new_tokens": [6, 6, 6, 6, 6, 5]}), inp)
    out = tmp_path / "out"
    res = run_cli("run", inp, "-o", out, "--id-column", "id", "--keep-columns", "temperature")
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert set(rows) == {f"row{i}" for i in range(len(prompts))}
    assert rows["row1"]["error"] == "prompt is null"
    assert rows["row2"]["error"] == rows["row3"]["error"] == "prompt is empty"
    assert "context window" in rows["row4"]["error"]
    for rid, n in (("row0", 6), ("row5", 5)):
        assert rows[rid]["error"] is None
        assert rows[rid]["output_token_ids"] == reference(tiny, prompts[int(rid[-1])], n)
    assert rows["row0"]["temperature"] == 0.0  # --keep-columns carried over
    report = read_report(out)
    assert report["rows"] == 6 and report["rows_failed"] == 4 and (out / "_SUCCESS").exists()


def test_interrupted_run_resumes_without_recomputing(tmp_path):
    inp = tmp_path / "in.parquet"
    rows, units = 64, 16  # many units: Ctrl-C must land part-way however fast the engine is
    prompts = [f"Row {i}: write about the number {i}." for i in range(rows)]
    pq.write_table(pa.table({"prompt": prompts}), inp)
    args = ["run", inp, "--max-new-tokens", NEW, "--ignore-eos", "--unit-rows", 4, "--max-inflight-units", 2]
    clean = tmp_path / "clean"  # the same job uninterrupted, beside the interrupted one
    reference_run = concurrent.futures.ThreadPoolExecutor(1).submit(run_cli, *args, "-o", clean)
    out = tmp_path / "resumed"
    # SIGINT back to its default in the child: a test run started in the background (nohup, `&`)
    # ignores it, the child would inherit that, and Python would never raise KeyboardInterrupt
    proc = subprocess.Popen([*PDBATCH, *map(str, args), "-o", str(out)], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.time() + 120
    while len(manifest_units(out)) < 3 and time.time() < deadline:
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGINT)  # Ctrl-C: the driver shuts its cluster down
    _, err = proc.communicate(timeout=120)
    wait_session_empty(proc.pid)
    assert proc.returncode == 130, err
    done_before = manifest_units(out)
    assert 3 <= len(done_before) < units, "the run must stop part-way"
    assert not (out / "_SUCCESS").exists()
    res = run_cli(*args, "-o", out)  # the resume, while the clean run may still be going
    assert res.returncode == 0, res.stderr
    assert reference_run.result().returncode == 0
    report = read_report(out)
    assert report["units_resumed"] == len(done_before)
    assert report["rows_this_run"] == rows - 4 * len(done_before)  # finished units not recomputed
    after = manifest_units(out)
    assert sorted(after) == sorted(set(after)) and len(after) == units  # none written twice
    assert read_rows(out) == [{**r, "ttft_s": r2["ttft_s"], "tpot_s": r2["tpot_s"], "prefill_worker":
                               r2["prefill_worker"], "decode_worker": r2["decode_worker"]}
                              for r, r2 in zip(read_rows(clean), read_rows(out))]
    assert len(glob.glob(str(out / "part-*.parquet"))) == units


def test_decode_worker_joining_mid_job_takes_work(tmp_path):
    """An existing cluster: scheduler + one worker per role; a second decode worker joins."""
    from reliability_helpers import ProcCluster

    # No nannies (three fewer processes to start on 2 cores): joining is the worker's doing;
    # test_slurm's jobs run the nanny'd `dask worker` on an existing cluster
    cluster = ProcCluster(tmp_path)
    try:
        cluster.start({"prefill-a": "prefill", "decode-a": "decode"})
        # the newcomer starts now and pays its imports, but registers only once the gate opens
        # (its preload runs before registration): it joins mid-job however short the job is
        cluster.add_worker("decode-b", "decode", gated=True)
        inp = tmp_path / "in.parquet"
        rows = 128  # after the gate opens, enough left for the newcomer's engine set-up and a share
        pq.write_table(pa.table({"prompt": [f"Tell me about item {i}." for i in range(rows)]}), inp)
        out = tmp_path / "out"
        driver = subprocess.Popen([*PDBATCH, "run", str(inp), "-o", str(out), "--scheduler-file",
                                   str(cluster.scheduler_file), "--max-new-tokens", "32", "--ignore-eos",
                                   "--unit-rows", "2", "--max-inflight-units", "4"],
                                  cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        # open the gate once the job is under way and the newcomer has paid its imports
        while not (len(manifest_units(out)) >= 2 and cluster.gate_ready()) and driver.poll() is None:
            time.sleep(0.1)
        cluster.open_gate()
        _, err = driver.communicate(timeout=300)
        assert driver.returncode == 0, err
        by_worker = read_report(out)["rows_by_decode_worker"]
        assert by_worker.get("decode-b", 0) >= 4, by_worker  # the newcomer took a share
        assert sum(by_worker.values()) == rows
    finally:
        cluster.close()


def test_embedded_cluster_leaves_the_driver_environment_as_it_was(monkeypatch):
    """A Nanny copies Dask's pre-spawn environment (OMP_NUM_THREADS=1, ...) into the process
    that starts it: after the job the driver's environment must be what it was, or whatever it
    starts next (pdbatch bench's vLLM baseline) inherits one OpenMP thread."""
    from pdbatch.config import build_config
    from pdbatch.driver.cluster import connect, start_worker_forkserver

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setenv("PDBATCH_TEST_MARK", "kept")
    before = dict(os.environ)
    cfg = build_config({"input": "in", "output": "out"})
    start_worker_forkserver(cfg)  # as `pdbatch run` does, before its model check
    with connect(cfg) as (client, _, _):
        assert len(scheduler_identity(client)["workers"]) == 2
        inside = os.environ.get("OMP_NUM_THREADS")
        # the workers forked from one forkserver (imports paid once), which had Dask's
        # pre-spawn environment
        parents = set(client.run(os.getppid).values())
        env = client.run(lambda: (os.environ.get("MALLOC_TRIM_THRESHOLD_"), os.environ.get("PYTHONHASHSEED")))
    assert inside == "1"  # what Dask set while its workers were started: the test can fail
    assert dict(os.environ) == before
    assert len(parents) == 1 and parents != {os.getpid()}
    assert "forkserver" in " ".join(psutil.Process(parents.pop()).cmdline())
    assert set(env.values()) == {("65536", "6640")}


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_engine_workers_keep_their_large_buffers_despite_dasks_trim_setting():
    """The Nanny gives every worker Dask's MALLOC_TRIM_THRESHOLD_=65536, which makes each large
    buffer an engine step allocates a fresh mmap (vLLM's CPU engine ran a third slower); once
    pdbatch's engine is set up on a worker (EngineHost.setup) its heap keeps them."""
    from pdbatch.config import build_config
    from pdbatch.driver.cluster import connect
    from pdbatch.driver.worker import EngineHost

    cfg = build_config({"input": "in", "output": "out"})
    with connect(cfg) as (client, _, _):
        assert set(client.run(os.environ.get, "MALLOC_TRIM_THRESHOLD_").values()) == {"65536"}
        before = client.run(big_buffer_faults)
        client.register_plugin(EngineHost(model=str(DEFAULT_MODEL), dtype="float32", device="cpu", mode="colocated",
                                          max_batch_tokens=256, kv_budget_bytes=64 << 20, max_num_seqs=8,
                                          max_model_len=0, threads=1))
        after = client.run(big_buffer_faults)
    assert len(before) == 2 and min(before.values()) > 50 * 1000  # each round faulted its pages in again
    assert max(after.values()) < min(before.values()) / 10


SLOW_TEARDOWN = """
import os, time

def dask_teardown(worker):  # a worker preload's: runs as the worker closes, like an engine's teardown
    time.sleep(6)
    open(os.path.join({out!r}, str(os.getpid())), "w").close()
"""


def test_a_worker_slow_to_close_is_given_time_to_finish(tmp_path):
    """Dask gives a closing worker 4 s before it SIGKILLs it (then a TimeoutError traceback when
    the killed process is slow to go, and the cluster's close waits to its timeout). A pdbatch
    worker's engine teardown and exit with a model's heap took longer on a loaded machine: the
    embedded cluster's Nanny lets a worker's close run to its end."""
    import dask

    from pdbatch.config import build_config
    from pdbatch.driver.cluster import connect

    closed = tmp_path / "closed"  # the markers alone (an import may leave __pycache__ beside the preload)
    closed.mkdir()
    preload = tmp_path / "slow_teardown.py"
    preload.write_text(SLOW_TEARDOWN.format(out=str(closed)))
    cfg = build_config({"input": "in", "output": "out"})
    with dask.config.set({"distributed.worker.preload": [str(preload)]}):
        with connect(cfg) as (client, _, _):
            pids = set(client.run(os.getpid).values())
    assert len(pids) == 2
    assert {p.name for p in closed.iterdir()} == {str(p) for p in pids}  # each finished
    assert not any(psutil.pid_exists(p) for p in pids)
