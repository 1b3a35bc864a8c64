"""Reliability (issue 6): worker deaths, driver death, crashes mid-write, memory, TLS, quarantine.

Every scenario runs the real `pdbatch` CLI on a real cluster of separate processes and hurts it
the way production does (SIGKILL of a worker or of the driver, a nanny killing a worker over its
memory limit, files a crash leaves behind). The
results are compared token by token with Hugging Face greedy `generate`, one prompt at a time,
which is what a clean run produces (test_pipeline.py checks that). Measured figures (recovery
times, peak RSS) are printed with `pytest -s` and appended to $PDBATCH_RELIABILITY_LOG.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pipeline_helpers import (DEFAULT_MODEL, manifest_units, read_rows, run_cli, run_clis, session_processes,
                              wait_for, wait_session_empty)
from reliability_helpers import (Driver, PeakRSS, ProcCluster, assert_complete_and_correct, make_tls_files, record,
                                 reference, report)

from pdbatch.driver.cluster import scheduler_identity
from pdbatch.engines.builtin.model import load_model

NEW = 24  # tokens per row: long enough that a unit is still decoding when a worker dies


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # the references: one thread is 30x faster than two fighting the cluster
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


def make_input(path, n: int) -> list[str]:
    prompts = [f"Item {i}: tell me everything about the number {i}." for i in range(n)]
    pq.write_table(pa.table({"prompt": prompts}), path)
    return prompts


def expected_for(tiny, prompts, name="in.parquet", n=NEW) -> dict:
    return {f"{name}:{i}": reference(tiny, p, n) for i, p in enumerate(prompts)}


def _addresses(client) -> dict[str, str]:
    return {str(w["name"]): a for a, w in scheduler_identity(client)["workers"].items()}


def unit_of(key) -> str:
    """`decode-00000-00000-00000004-<job token>-<attempt>` -> `00000-00000-00000004`."""
    return str(key).split("-", 1)[1].rsplit("-", 2)[0]


def watch_recovery(driver: Driver, out, t_kill: float, lost: set[str]) -> float | None:
    """Seconds from the kill until every lost unit is in the manifest (None if the driver
    exited first)."""
    while driver.proc.poll() is None:
        if lost <= set(manifest_units(out)):
            return time.time() - t_kill
        time.sleep(0.05)
    return time.time() - t_kill if lost <= set(manifest_units(out)) else None


# --- worker deaths (a cluster of `dask scheduler` / `dask worker` processes) ---------------------

def test_prefill_worker_killed_while_holding_unpulled_kv(tmp_path, tiny):
    """SIGKILL the prefill worker while it holds KV packets that no decode worker has pulled:
    the decode workers are not up yet (still loading a big model, preempted...), so prefilled
    units wait on the prefill worker. A replacement prefill worker and a decode worker join."""
    prompts = make_input(tmp_path / "in.parquet", 24)
    out = tmp_path / "out"
    cluster = ProcCluster(tmp_path)
    driver = None
    try:
        cluster.start_scheduler()
        cluster.add_worker("prefill-a", "prefill")
        # the replacements start now (their imports overlap the job) but join only after the kill
        cluster.add_worker("prefill-b", "prefill", gated=True)
        cluster.add_worker("decode-a", "decode", gated=True)
        driver = Driver("run", tmp_path / "in.parquet", "-o", out, "--scheduler-file", cluster.scheduler_file,
                        "--max-new-tokens", NEW, "--ignore-eos", "--unit-rows", 2, "--max-inflight-units", 6,
                        "--progress", "none", "--no-rebalance")  # fixed roles: the KV waits on prefill-a
        expected = expected_for(tiny, prompts)  # while the driver starts
        with cluster.client() as client:
            prefill_a = wait_for(lambda: _addresses(client).get("prefill-a"), 60, "prefill-a")

            def unpulled():  # this job's prefill results; their only copy is on prefill-a
                held = [k for k, who in client.who_has().items()
                        if str(k).startswith("prefill-") and list(who) == [prefill_a]]
                return held if len(held) >= 6 else None

            held = wait_for(unpulled, 120, "prefill-a to hold the whole window's KV")
        t_kill = cluster.kill("prefill-a")
        cluster.open_gate()  # prefill-b and decode-a register
        recovery_s = watch_recovery(driver, out, t_kill, {unit_of(k) for k in held})
        assert driver.finish() == 0, driver.stderr
        total_s = time.time() - t_kill
        assert_complete_and_correct(out, prompts, expected, units=12)
        r = report(out)
        assert r["unit_retries"] == len(held) and r["rows_quarantined"] == 0
        assert r["rows_by_prefill_worker"] == {"prefill-b": 24}  # all recomputed by the newcomer
        assert "starting it again (attempt 2/3)" in driver.stderr and "Traceback" not in driver.stderr
        assert "left (its connection to the scheduler closed" in driver.stderr  # why, from the scheduler's events
        record("prefill worker killed", units_lost=len(held), retries=r["unit_retries"],
               kill_to_lost_units_written_s=round(recovery_s, 2), kill_to_job_end_s=round(total_s, 2),
               note="includes the replacement workers joining (started beforehand) and loading the model")
    finally:
        if driver:
            driver.stop()
        cluster.close()


def test_prefill_worker_killed_after_its_kv_was_pulled(tmp_path, tiny):
    """SIGKILL the prefill worker while the decode worker decodes units whose KV it already
    pulled: Dask keeps that copy, so those units go on and are not prefilled or decoded again;
    the units whose KV was only on the dead worker are redone on a replacement."""
    prompts = make_input(tmp_path / "in.parquet", 24)
    new = 128
    out = tmp_path / "out"
    cluster = ProcCluster(tmp_path)
    driver = None
    try:
        cluster.start({"prefill-a": "prefill", "decode-a": "decode"})
        cluster.add_worker("prefill-b", "prefill", gated=True)  # the replacement, joins after the kill
        driver = Driver("run", tmp_path / "in.parquet", "-o", out, "--scheduler-file", cluster.scheduler_file,
                        "--max-new-tokens", new, "--ignore-eos", "--unit-rows", 2, "--max-inflight-units", 8,
                        "--progress", "none", "--no-rebalance")
        with cluster.client() as client:
            addrs = wait_for(lambda: len(_addresses(client)) == 2 and _addresses(client), 120, "workers")
            pulled = {addrs["prefill-a"], addrs["decode-a"]}

            def decoding_pulled_kv():  # prefill results decode-a fetched and still decodes from
                held = [k for k, who in client.who_has().items()
                        if str(k).startswith("prefill-") and set(who) == pulled]
                return len(held) >= 2 and held

            wait_for(decoding_pulled_kv, 120, "decode-a to decode pulled KV", every=0.01)
            # decode-a is held still while the driver sees the loss, so the pulled units are
            # still decoding then however fast this machine decodes (the scheduler keeps a
            # stopped worker: its heartbeats are due only within distributed.scheduler.worker-ttl)
            cluster.signal("decode-a", signal.SIGSTOP)
            cluster.kill("prefill-a")
            time.sleep(4)  # the driver re-reads the workers every 0.5 s
            cluster.signal("decode-a", signal.SIGCONT)
        cluster.open_gate()
        expected = expected_for(tiny, prompts, n=new)  # while the job ends (it outlasted a whole job before)
        assert driver.finish() == 0, driver.stderr
        rows = assert_complete_and_correct(out, prompts, expected, units=12)
        r = report(out)
        kept = r["units_kept_after_prefill_worker_left"]
        assert kept >= 1 and r["rows_quarantined"] == 0
        assert driver.stderr.count("so the decode goes on") == kept, driver.stderr
        # a kept unit's rows keep their first prefill; only the restarted ones were prefilled again
        assert sum(x["prefill_worker"] == "prefill-a" for x in rows) >= 2 * kept
        assert r["unit_retries"] == len(r["unit_failures"])
        assert all("prefill-a" in f["error"] and "left" in f["error"] for f in r["unit_failures"])
        assert "Traceback" not in driver.stderr
    finally:
        if driver:
            driver.stop()
        cluster.close()


def test_decode_worker_deaths(tmp_path, tiny):
    """SIGKILL a decode worker mid-generation: a surviving decode worker redoes its units.
    Then SIGKILL the last one: the job stops after --worker-timeout (exit 1, one clear line),
    resumable; rerun with a replacement decode worker, it completes, nothing written twice."""
    from pdbatch.driver.worker import worker_status

    prompts = make_input(tmp_path / "in.parquet", 64)  # 16 units: enough left when decode-b dies (~6 done)
    out = tmp_path / "out"
    args = ["run", tmp_path / "in.parquet", "-o", out, "--max-new-tokens", NEW, "--ignore-eos", "--unit-rows", 4,
            "--max-inflight-units", 4, "--worker-timeout", 6, "--progress", "none",
            "--no-rebalance"]  # fixed roles: with no decode worker left, the job stops
    cluster = ProcCluster(tmp_path)
    driver = again = None
    try:
        cluster.start({"prefill-a": "prefill", "decode-a": "decode", "decode-b": "decode"})
        cluster.add_worker("decode-c", "decode", gated=True)  # the replacement: joins after the stop
        expected = expected_for(tiny, prompts)
        with cluster.client() as client:
            addrs = wait_for(lambda: (lambda a: a if len(a) == 3 else None)(_addresses(client)), 60, "workers")
            driver = Driver(*args, "--scheduler-file", cluster.scheduler_file)

            def decoding(name):  # the worker's engine has sequences in generation right now
                def check():
                    got = client.run(worker_status, workers=[addrs[name]], on_error="return")
                    status = got.get(addrs[name])
                    return isinstance(status, dict) and status.get("active", 0) > 0
                return check

            wait_for(decoding("decode-a"), 120, "decode-a to be generating")
            lost = {unit_of(k) for k in client.processing([addrs["decode-a"]])[addrs["decode-a"]]}
            t_kill = cluster.kill("decode-a")
            assert lost, "decode-a held no unit when killed"
            survivor_s = watch_recovery(driver, out, t_kill, lost)
            assert survivor_s is not None, "the survivor did not redo decode-a's units"
            before = len(manifest_units(out))
            wait_for(lambda: any(str(k).startswith("decode-") for k in
                                 client.processing([addrs["decode-b"]])[addrs["decode-b"]]), 60, "decode-b busy")
            t_kill2 = cluster.kill("decode-b")  # the last decode worker: none left, none joins
        assert driver.finish(timeout=120) == 1
        stopped_after = time.time() - t_kill2
        last = driver.stderr.strip().splitlines()[-1]
        assert last.startswith("pdbatch: job failed: no decode worker available for 6s"), driver.stderr
        assert "rerun the same command to resume" in last
        done = manifest_units(out)
        assert before <= len(done) < 16 and not (out / "_SUCCESS").exists()

        cluster.open_gate()  # a replacement registers, then the same command again
        again = Driver(*args, "--scheduler-file", cluster.scheduler_file)
        assert again.finish() == 0, again.stderr
        rows = assert_complete_and_correct(out, prompts, expected, units=16)
        r = report(out)
        assert r["units_resumed"] == len(done) and r["rows_this_run"] == 64 - 4 * len(done)
        by_decode = {row["decode_worker"] for row in rows}
        assert "decode-c" in by_decode and by_decode <= {"decode-a", "decode-b", "decode-c"}
        entries = {json.loads(ln)["unit"]: json.loads(ln) for ln in (out / "_pdbatch" / "manifest.jsonl").open()}
        for unit in lost:  # the units decode-a held were redone by the survivor
            assert entries[unit]["rows_by_decode_worker"] == {"decode-b": 4}, entries[unit]
        record("decode worker killed", units_lost=len(lost), kill_to_lost_units_written_s=round(survivor_s, 2),
               last_decode_worker_killed_to_exit_s=round(stopped_after, 2), units_done_before_stop=len(done))
    finally:
        for d in (driver, again):
            if d:
                d.stop()
        cluster.close()


# --- driver death and crashes mid-write (embedded cluster) ---------------------------------------

@pytest.fixture(scope="module")
def driver_killed(tmp_path_factory, tiny):
    """SIGKILL `pdbatch run` mid-job; its orphaned workers must exit by themselves; rerun."""
    tmp = tmp_path_factory.mktemp("driver-kill")
    prompts = make_input(tmp / "in.parquet", 40)
    out = tmp / "out"
    args = ["run", tmp / "in.parquet", "-o", out, "--max-new-tokens", NEW, "--ignore-eos", "--unit-rows", 4,
            "--max-inflight-units", 2, "--progress", "none"]
    driver = Driver(*args)
    try:
        expected = expected_for(tiny, prompts)  # (~4 s) while the driver starts: well before 3 units
        driver.wait_units(out, 3)
        orphans = {p.pid for p in session_processes(driver.proc.pid)} - {driver.proc.pid}
        os.kill(driver.proc.pid, signal.SIGKILL)
        t_kill = time.time()
        driver.proc.wait(timeout=30)
        # no one cleans up after a SIGKILLed driver: its workers must notice and exit themselves
        wait_session_empty(driver.proc.pid, timeout=90)
        orphans_gone_s = time.time() - t_kill
    finally:
        driver.stop()
    done = manifest_units(out)
    stamps = {u: os.stat(out / f"part-{u}.parquet").st_mtime_ns for u in done}
    res = run_cli(*args)
    return dict(out=out, prompts=prompts, expected=expected, done=done, stamps=stamps, res=res, args=args,
                orphans=len(orphans), orphans_gone_s=orphans_gone_s)


def test_driver_killed_mid_job_resumes(driver_killed):
    k = driver_killed
    out, done = k["out"], k["done"]
    assert k["orphans"] >= 2  # the two workers (nanny processes live in the driver itself)
    assert 3 <= len(done) < 10 and len(done) == len(set(done))
    assert k["res"].returncode == 0, k["res"].stderr
    r = report(out)
    assert r["units_resumed"] == len(done) and r["rows_this_run"] == 40 - 4 * len(done)
    for u, stamp in k["stamps"].items():  # finished units were not recomputed, not even rewritten
        assert os.stat(out / f"part-{u}.parquet").st_mtime_ns == stamp
    assert_complete_and_correct(out, k["prompts"], k["expected"], units=10)
    record("driver killed", units_done_before_kill=len(done), orphan_workers=k["orphans"],
           orphans_exited_after_s=round(k["orphans_gone_s"], 2))


def test_crash_while_writing_is_never_done_nor_data(driver_killed, tmp_path):
    """What a crash mid-write can leave: a temp shard, a shard without its manifest line, a
    manifest line torn in half; plus a shard truncated under its manifest line. None of them
    counts as done or is read as data, and the next run redoes exactly those units."""
    import pyarrow.dataset as ds

    from pdbatch.io.output import OutputDir

    out = tmp_path / "out"
    shutil.copytree(driver_killed["out"], out)
    (out / "_SUCCESS").unlink()  # a crashed run never got that far
    units = sorted(manifest_units(out))
    truncated, unrecorded = units[2], units[5]
    good = (out / f"part-{units[0]}.parquet").read_bytes()
    (out / f".tmp-{units[7]}-0badc0de.parquet").write_bytes(good[: len(good) // 2])  # worker died mid-write
    part = out / f"part-{truncated}.parquet"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])
    manifest = out / "_pdbatch" / "manifest.jsonl"
    lines = [ln for ln in manifest.read_text().splitlines() if json.loads(ln)["unit"] != unrecorded]
    torn = json.dumps({"unit": units[9], "rows": 4})[:20]
    manifest.write_text("\n".join(lines) + "\n" + torn)  # the driver died mid-append

    done = OutputDir(str(out)).done_units()
    assert set(done) == set(units) - {truncated, unrecorded}
    # readers skip hidden names: the temp file is never data
    files = ds.dataset(str(out), format="parquet", exclude_invalid_files=False).files
    assert not any(os.path.basename(f).startswith(".tmp-") for f in files)

    res = run_cli(*driver_killed["args"][:3], out, *driver_killed["args"][4:])
    assert res.returncode == 0, res.stderr
    r = report(out)
    assert r["units_resumed"] == 8 and r["rows_this_run"] == 8  # exactly the two broken units redone
    assert not list(out.glob(".tmp-*"))
    assert_complete_and_correct(out, driver_killed["prompts"], driver_killed["expected"], units=10)
    assert all(ln.endswith("}") for ln in manifest.read_text().splitlines())


def test_write_interrupted_in_process(tmp_path, monkeypatch):
    """A writer killed between writing the temp file and the rename leaves only a hidden temp
    file: not a shard, not done, not data, and removed by the next run's prepare()."""
    import pyarrow.dataset as ds

    import pdbatch.io.output as output
    from pdbatch.engines.request import SequenceOutput
    from pdbatch.io.output import OutputDir, outputs_to_table, write_shard

    out = OutputDir(str(tmp_path))
    out.prepare({"job": 1}, overwrite=False)
    table = outputs_to_table([SequenceOutput(id="a", output_token_ids=[1], generated_text="x")])

    def crash(*_):
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(output.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(str(tmp_path), "u1", table)
    monkeypatch.undo()
    assert [p.name.startswith(".tmp-u1-") for p in tmp_path.iterdir() if p.is_file()] == [True]
    assert ds.dataset(str(tmp_path), format="parquet").to_table().num_rows == 0
    out.record({"unit": "u1", "rows": 1})  # even a manifest line does not make it done
    assert OutputDir(str(tmp_path)).prepare({"job": 1}, overwrite=False) == {}
    assert not [p for p in tmp_path.iterdir() if p.is_file()]
    assert (tmp_path / "_pdbatch" / "manifest.jsonl").read_text() == ""


# --- memory: the decode KV budget, measured RSS ---------------------------------------------------

def long_prompts(tiny, n: int, tokens: int) -> list[str]:
    words = ["river", "stone", "lantern", "orbit", "copper", "meadow", "signal", "harbor", "ember", "quartz"]
    out = []
    for i in range(n):
        text = f"Document {i}:"
        while len(tiny.tokenizer(text)["input_ids"]) < tokens:
            text += " " + " ".join(words[(i + j * 7) % len(words)] + str(j % 97) for j in range(64))
        out.append(text)
    return out


def test_kv_budget_long_prompts_small_budget(tmp_path, tiny):
    """Long prompts (~1500 tokens) with a decode KV budget that holds only two of them at once
    (run over `--tls auto`, and checked to listen on loopback only): every row finishes equal to
    the reference, the KV pool never exceeds the budget, no worker exceeds its memory limit."""
    per_token = 2 * 4 * 2 * 32 * 4  # layers x K/V x kv_heads x head_dim x fp32 bytes (data/tiny-llama)
    budget = 7 * 2**20  # two reservations of ~1.5K tokens (6 MiB), not three (9 MiB)
    prompts = long_prompts(tiny, 12, 1450)
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    driver = Driver("run", tmp_path / "in.parquet", "-o", out, "--max-new-tokens", 8, "--ignore-eos",
                    "--unit-rows", 4, "--kv-budget", budget, "--worker-memory-limit", "2GiB", "--tls", "auto",
                    "--progress", "none")
    sampler = PeakRSS(driver.proc.pid)
    try:
        expected = expected_for(tiny, prompts, n=8)  # while the driver starts its cluster
        assert driver.finish() == 0, driver.stderr
    finally:
        sampler.stop()
        driver.stop()
    assert_complete_and_correct(out, prompts, expected, units=3)
    r = report(out)
    # no worker was restarted for memory; on failure, the driver's log says why units were redone
    assert r["protocol"] == "tls" and r["unit_retries"] == 0, driver.stderr[-4000:]
    # with rebalancing either worker may decode (its engine has both phases): every worker has
    # the budget and stays in it, and a worker that decoded a 4-row unit held two rows at once
    mem = r["worker_memory"]
    assert {m["kv_budget_bytes"] for m in mem.values()} == {budget}
    longest = max(len(tiny.tokenizer(p)["input_ids"]) for p in prompts) + 8
    assert all(m["kv_pool_peak_bytes"] <= budget for m in mem.values()), mem  # never exceeded
    decoders = [name for name, n in r["rows_by_decode_worker"].items() if n]
    assert decoders and all(mem[name]["kv_pool_peak_bytes"] >= 2 * longest * per_token for name in decoders), mem
    rss = {name: max(m["peak_rss_bytes"], sampler.peak.get(m["pid"], 0)) for name, m in r["worker_memory"].items()}
    assert max(rss.values()) < 2 * 2**30
    ips = {ip for _, ip, _ in sampler.listening}
    assert ips == {"127.0.0.1"}, sampler.listening  # the embedded cluster listens on loopback only
    record("long prompts, small KV budget", kv_budget_mib=round(budget / 2**20, 1),
           kv_pool_peak_mib={name: round(m["kv_pool_peak_bytes"] / 2**20, 2) for name, m in mem.items()},
           decode_peak_rss_mib=round(rss["decode-0"] / 2**20), prefill_peak_rss_mib=round(rss["prefill-0"] / 2**20),
           driver_peak_rss_mib=round(sampler.peak.get(driver.proc.pid, 0) / 2**20),
           listening=sorted(sampler.listening))


def test_packets_waiting_on_a_decode_worker_stay_within_its_budget(tmp_path, tiny):
    """Prefill outruns decode (short prompts, long outputs) under a small KV budget: once a
    decode worker has two units and a budget's worth of packets, further units wait with their
    packets on the prefill worker instead of piling them up on the decode worker, where they
    would sit outside its pool's budget; every row still comes out right."""
    per_token = 2 * 4 * 2 * 32 * 4  # data/tiny-llama, fp32
    prompts = long_prompts(tiny, 16, 250)  # 260-263 tokens
    new = 48
    budget = 3 * 2**19  # 1.5 MiB: two reservations of ~310 tokens (pool rows round to 320: 640 KiB each)
    unit_kv = 2 * 260 * per_token  # ~1.02 MiB of packets: two units are more than the budget
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    out = tmp_path / "out"
    driver = Driver("run", tmp_path / "in.parquet", "-o", out, "--max-new-tokens", new, "--ignore-eos",
                    "--unit-rows", 2, "--kv-budget", budget, "--progress", "none")
    try:
        expected = expected_for(tiny, prompts, n=new)  # while the driver starts its cluster
        assert driver.finish() == 0, driver.stderr
    finally:
        driver.stop()
    assert_complete_and_correct(out, prompts, expected, units=8)
    dec = report(out)["worker_memory"]["decode-0"]
    # measured, and never more than two units' packets (the driver's window of 6 units in flight
    # would otherwise let all 6 reach it, ~6.3 MiB)
    assert unit_kv <= dec["kv_routed_peak_bytes"] < 3 * unit_kv, dec
    assert dec["kv_pool_peak_bytes"] <= budget


# --- security: TLS with the cluster's own certificates ------------------------------------------

def _identity(address: str, security) -> dict:
    """What a Dask endpoint answers to `identity` over a connection made with `security`."""
    import asyncio

    from distributed.comm import connect

    async def ask():
        comm = await connect(address, timeout=3, **security.get_connection_args("client"))
        try:
            await comm.write({"op": "identity", "reply": True})
            return await comm.read()
        finally:
            comm.abort()

    # a TLS server may neither answer nor hang up on a plain-tcp client: no answer is a refusal
    return asyncio.run(asyncio.wait_for(ask(), 5))


def test_tls_cluster_only_certified_peers(tmp_path, tiny):
    """A cluster started with TLS certificate files (as on a multi-node cluster): every Dask
    endpoint answers a peer whose certificate comes from the cluster's CA and no one else (not
    plain tcp, not another CA); a driver without the certificate cannot submit work (exit 2,
    one line); with it, the job runs over tls:// and is correct."""
    from distributed.security import Security

    ca, cert, key = make_tls_files(tmp_path, "cluster")
    other = make_tls_files(tmp_path, "intruder")
    good = Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)
    intruder = Security(tls_ca_file=other[0], tls_client_cert=other[1], tls_client_key=other[2],
                        require_encryption=True)
    prompts = make_input(tmp_path / "in.parquet", 8)
    expected = expected_for(tiny, prompts, n=8)
    cluster = ProcCluster(tmp_path, tls=(ca, cert, key))
    try:
        cluster.start_scheduler()
        cluster.add_worker("prefill-a", "prefill")
        cluster.add_worker("decode-a", "decode")
        with cluster.client_tls(good) as client:
            wait_for(lambda: len(scheduler_identity(client)["workers"]) == 2, 60, "workers")
            info = scheduler_identity(client)
        endpoints = [info["address"], *info["workers"]]  # every Dask endpoint: scheduler and workers
        listening = {(c.laddr.ip, c.laddr.port) for p in cluster.procs.values()
                     for c in psutil.Process(p.pid).net_connections(kind="inet") if c.status == psutil.CONN_LISTEN}
        assert {ip for ip, _ in listening} == {"127.0.0.1"}  # the rest are the HTTP dashboards
        kinds = []
        for address in endpoints:
            assert address.startswith("tls://127.0.0.1:")
            host, port = address[len("tls://"):].rsplit(":", 1)
            assert (host, int(port)) in listening
            kinds.append(_identity(address, good)["type"])
            for other_address, sec in ((address, intruder), (f"tcp://{host}:{port}", Security())):
                with pytest.raises(Exception):
                    _identity(other_address, sec)
        assert sorted(kinds) == ["Scheduler", "Worker", "Worker"], kinds

        base = ["run", tmp_path / "in.parquet", "--scheduler-file", cluster.scheduler_file, "--max-new-tokens", 8,
                "--ignore-eos", "--unit-rows", 2, "--progress", "none"]
        out = tmp_path / "out"
        # side by side (independent: the refused one never gets past the TLS handshake)
        refused, res = run_clis([*base, "-o", tmp_path / "refused"],
                                [*base, "-o", out, "--tls-ca-file", ca, "--tls-cert", cert, "--tls-key", key])
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "uses TLS" in refused.stderr
        assert res.returncode == 0, res.stderr
        assert_complete_and_correct(out, prompts, expected, units=4)
        assert report(out)["protocol"] == "tls"
    finally:
        cluster.close()


# --- bounded retries, then quarantine of a row that keeps killing workers ------------------------

@pytest.fixture(scope="module")
def fragile_model(tmp_path_factory):
    """A toy Llama with a 2M-token context window (so a multi-megabyte prompt is not ruled out
    by its length), whose tokenizer knows one token more than its embedding has rows (a token
    added without resizing the embedding: a common fine-tuning slip)."""
    from transformers import AutoTokenizer

    from pdbatch.toymodels import build_llama

    path = build_llama(tmp_path_factory.mktemp("models") / "long-llama", seed=0, max_position_embeddings=1 << 21)
    tok = AutoTokenizer.from_pretrained(path)
    tok.add_tokens(["<|oops|>"])
    tok.save_pretrained(path)
    return str(path)


def test_row_that_kills_workers_is_quarantined(tmp_path, fragile_model):
    """A 5 MB prompt makes the tokenizer outgrow the worker's memory limit, so the nanny kills
    the prefill worker every time that row is tried: a genuine worker-killing row. After
    --max-attempts tries of its unit, its rows run one at a time alone on the cluster; the culprit
    is quarantined with an error, every other row completes, the job succeeds. A row whose
    token is outside the model's embedding is refused as a row error before the forward."""
    import random

    torch.set_num_threads(1)
    lm = load_model(fragile_model, dtype="float32", device="cpu")
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "token", "memory", "worker", "killer", "prompt", "row"]
    poison = " ".join(rng.choice(words) + str(rng.randint(0, 99)) for _ in range(5_000_000 // 8))
    prompts = [f"Question {i}: what comes after {i}?" for i in range(9)]
    prompts[4], prompts[7] = poison, "Please say <|oops|> now."
    pq.write_table(pa.table({"prompt": prompts}), tmp_path / "in.parquet")
    expected = {f"in.parquet:{i}": reference(lm, p, 8) for i, p in enumerate(prompts) if i not in (4, 7)}
    out = tmp_path / "out"
    # two prefill workers: the job must not hang on one nanny that fails to bring its worker back
    res = run_cli("run", tmp_path / "in.parquet", "-o", out, "--model", fragile_model, "--max-new-tokens", 8,
                  "--ignore-eos", "--unit-rows", 3, "--max-attempts", 2, "--worker-memory-limit", "1GiB",
                  "--kv-budget", "64MiB", "--prefill-workers", 2, "--worker-timeout", 120, "--progress", "none",
                  "--no-rebalance",  # fixed roles: the row kills the prefill workers
                  timeout=400)
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert sorted(rows) == sorted(f"in.parquet:{i}" for i in range(9))
    for rid, tokens in expected.items():
        assert rows[rid]["error"] is None and rows[rid]["output_token_ids"] == tokens, rid
    bad = rows["in.parquet:4"]
    assert bad["error"].startswith("quarantined after 3 failed attempts: worker prefill-"), bad["error"]
    assert bad["output_token_ids"] is None and bad["generated_text"] is None
    assert "outside the model's vocabulary of 4096 ids" in rows["in.parquet:7"]["error"]
    r = report(out)
    assert r["rows_quarantined"] == 1 and r["rows_failed"] == 2 and r["unit_retries"] >= 3
    assert (out / "_SUCCESS").exists() and len(manifest_units(out)) == 3
    assert "quarantined after 3 failed attempts" in res.stderr and "Traceback" not in res.stderr
    record("poison row quarantined", unit_retries=r["unit_retries"], wall_s=r["wall_s"])


# --- small pieces, no cluster -----------------------------------------------------------------------

def test_tls_and_reliability_options_from_a_job_file(tmp_path):
    from pdbatch.config import build_config

    ca, cert, key = make_tls_files(tmp_path)
    (tmp_path / "job.toml").write_text(f'worker_timeout = 30\nmax_attempts = 5\nworker_memory_limit = "4GiB"\n'
                                       f'[tls]\nca_file = "{ca}"\ncert = "{cert}"\nkey = "{key}"\n')
    cfg = build_config({}, str(tmp_path / "job.toml"))
    assert (cfg.tls, cfg.tls_ca_file, cfg.tls_cert, cfg.tls_key) == ("files", ca, cert, key)
    assert (cfg.worker_timeout, cfg.max_attempts, cfg.worker_memory_limit) == (30, 5, "4GiB")
    from pdbatch.driver.security import job_security

    sec = job_security(cfg)
    assert sec.require_encryption and sec.tls_ca_file == ca and sec.tls_worker_cert == cert
    assert job_security(build_config({"tls": "auto"})).require_encryption  # per-job, in memory


def test_latency_samples_are_bounded():
    """The driver keeps at most `cap` TTFT/TPOT samples however many rows run (report.py)."""
    from pdbatch.monitoring.report import Reservoir, percentile

    r = Reservoir(cap=1000, recent=100)
    sent = 0
    for start in range(0, 100_000, 50):
        r += [float(v) for v in range(start, start + 50)]
        new = r.since(sent)  # an incremental reader (progress.py) gets exactly the new samples
        assert new == [float(v) for v in range(start, start + 50)]
        sent = r.seen
    assert len(r) == 1000 and r.seen == 100_000
    assert abs(percentile(r, 50) - 50_000) < 5_000  # a uniform sample: the median stays close


def test_a_gather_left_pending_at_client_close_prints_no_traceback():
    """Seen under load: the driver gave up on a write's result (RESULT_TIMEOUT_S), restarted the
    unit, and at exit asyncio printed "Task exception was never retrieved" with Dask's AllExit
    traceback after the job's last line. The driver's log set-up drops exactly that record."""
    code = (
        "import asyncio, gc, logging\n"
        "from distributed.client import AllExit\n"
        "from pdbatch.driver.cluster import quiet_dask_logs\n"
        "logging.basicConfig(format='%(message)s')\n"
        "quiet_dask_logs()\n"
        "async def boom(exc):\n"
        "    raise exc\n"
        "async def main():\n"
        "    for exc in (AllExit(), ValueError('kept')):\n"
        "        t = asyncio.ensure_future(boom(exc))\n"
        "        await asyncio.sleep(0.01)\n"
        "        del t\n"
        "        gc.collect()\n"
        "asyncio.run(main())\n")
    res = _python(code)
    assert "AllExit" not in res.stderr
    assert res.stderr.count("Task exception was never retrieved") == 1 and "ValueError: kept" in res.stderr


def _python(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter (its own logging set-up); it must exit 0."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return res


def test_a_heartbeat_racing_the_workers_close_prints_no_traceback():
    """Dask's heartbeat, in flight while its worker closes, finds the connection pool closed
    and logged a RuntimeError traceback after the job's last line, twice: Dask's record, then
    tornado's for the periodic callback it re-raised into. A real worker, its pool closed, then
    a heartbeat run by its own periodic callback: without the worker's log set-up the tracebacks
    print; with it, not, and another heartbeat failure still does."""
    code = (
        "import asyncio, logging, sys\n"
        "from distributed import Scheduler, Worker\n"
        "from pdbatch.driver.worker import quiet_worker_logs\n"
        "logging.basicConfig(format='%(name)s: %(message)s')\n"
        "async def beat(w):\n"
        "    await w.periodic_callbacks['heartbeat']._run()  # what tornado runs, its logging included\n"
        "    print('beat done', file=sys.stderr, flush=True)\n"
        "async def main():\n"
        "    async with Scheduler(dashboard_address=':0') as s:\n"
        "        for quiet in (False, True):\n"
        "            w = await Worker(s.address, dashboard=False)\n"
        "            if quiet:\n"
        "                quiet_worker_logs()\n"
        "            print('quiet' if quiet else 'loud', file=sys.stderr, flush=True)\n"
        "            await w.rpc.close()\n"
        "            await beat(w)\n"
        "            await w.close()\n"
        "asyncio.run(main())\n")
    res = _python(code)
    loud, quiet = res.stderr.split("\nquiet\n")
    assert "Unexpected exception during heartbeat" in loud and "Traceback" in loud
    assert "Exception in callback" in loud and "Worker.heartbeat" in loud
    assert "Unexpected exception during heartbeat" not in quiet and "Traceback" not in quiet, quiet
    assert "Exception in callback" not in quiet and quiet.count("beat done") == 1
    record = logging.LogRecord("distributed.worker", logging.ERROR, __file__, 1,
                               "Unexpected exception during heartbeat. Closing worker.", None,
                               (ValueError, ValueError("other"), None))
    from pdbatch.driver.worker import _DropHeartbeatAfterClose
    assert _DropHeartbeatAfterClose().filter(record)  # any other failure still prints


def test_the_driver_sees_every_worker_while_the_clients_own_refresh_runs():
    """The pipeline takes a worker missing from the scheduler's identity for one that left, and
    restarts its units. `Client.scheduler_info` returned a cache that the client's periodic
    refresh (workers left out) overwrites, so now and then it listed no worker at all."""
    import dask
    from distributed import Client, LocalCluster

    with dask.config.set({"distributed.client.scheduler-info-interval": "20ms"}), \
            LocalCluster(n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.wait_for_workers(2)
        seen = [len(scheduler_identity(client)["workers"]) for _ in range(3000)]
    assert seen.count(2) == len(seen), f"{len(seen) - seen.count(2)} of {len(seen)} answers lacked a worker"
