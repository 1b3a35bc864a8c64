"""Dask over UCXX, CPU only: a prefill worker's result is fetched by a decode worker.

Real processes on loopback: `dask scheduler --protocol ucxx` and two `dask worker`s (one with
``--resources prefill=1``, one with ``--resources decode=1``); the test process is the client.

What UCXX needs on a CPU-only machine (checked with distributed-ucxx-cu12 0.52, ucxx 0.52,
libucx 1.21, dask/distributed 2026.7.1 -- rapids-dask-dependency pins that dask):
- ``pip install distributed-ucxx-cu12``: registers the ``ucxx://`` (and ``ucx://``) comm.
- ``UCX_TLS=tcp`` in the environment of *every* process (scheduler, workers, client) before
  its first ucxx comm. It runs without it too (UCX then picks its own transports, shared
  memory on one host), but tcp is what crosses nodes without InfiniBand, and with no
  ``cuda`` in UCX_TLS distributed-ucxx never tries to create a CUDA context: no GPU needed.
- ``UCX_WARN_UNUSED_ENV_VARS=n``: silences a harmless UCX warning (UCX_MEMTYPE_CACHE).
- Nothing else: no dask config, no RMM, no CUDA driver. Addresses are
  ``ucxx://127.0.0.1:PORT``; ``--host 127.0.0.1`` keeps everything on loopback.
Per DESIGN.md ucxx is 3-6x slower than Dask's tcp comm on loopback CPU: tcp is the CPU default.
"""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from distributed import Client

from pdbatch.driver.cluster import scheduler_identity

try:
    import distributed_ucxx  # noqa: F401  (registers the ucxx:// comm)
except ImportError:  # a loud error, not a skip: the `test` extra requires it
    pytest.fail("distributed-ucxx-cu12 is missing: run `bash scripts/test.sh` "
                "(it installs the `test` extra)", pytrace=False)

UCX_ENV = {"UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n"}
N = 512 * 1024  # float64 -> 4 MiB


def _spawn(args, env, log):
    return subprocess.Popen(
        [sys.executable, "-m", "dask", *args],  # == `dask scheduler ...` / `dask worker ...`
        env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True)


def _stop(procs):
    for p in reversed(procs):  # workers first, scheduler last
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    for p in procs:
        try:
            p.wait(timeout=20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


@pytest.fixture
def ucxx_cluster(tmp_path, monkeypatch):
    for k, v in UCX_ENV.items():
        monkeypatch.setenv(k, v)  # the client (this process) needs them too
    # scratch dirs and locks of scheduler and workers under tmp_path, not /tmp/dask-scratch-space
    env = {**os.environ, **UCX_ENV, "DASK_TEMPORARY_DIRECTORY": str(tmp_path),
           # no Active Memory Manager: its ReduceReplicas may drop the prefill worker's copy once
           # the decode worker holds one (seen under load), and the test asks where the data is
           "DASK_DISTRIBUTED__SCHEDULER__ACTIVE_MEMORY_MANAGER__START": "False"}
    sched_file = tmp_path / "scheduler.json"
    log = open(tmp_path / "dask.log", "wb")
    procs = []
    try:
        procs.append(_spawn(["scheduler", "--protocol", "ucxx", "--host", "127.0.0.1",
                             "--port", "0", "--no-dashboard", "--scheduler-file",
                             str(sched_file)], env, log))
        deadline = time.monotonic() + 60
        while not sched_file.exists():
            assert procs[0].poll() is None, (tmp_path / "dask.log").read_text()
            assert time.monotonic() < deadline, "scheduler did not write its file"
            time.sleep(0.1)
        address = json.loads(sched_file.read_text())["address"]
        assert address.startswith("ucxx://"), address
        for role in ("prefill", "decode"):
            procs.append(_spawn(["worker", address, "--name", role, "--resources", f"{role}=1",
                                 "--nthreads", "1", "--no-nanny", "--no-dashboard",
                                 "--host", "127.0.0.1"], env, log))
        with Client(address, timeout=60) as client:
            client.wait_for_workers(2, timeout=90)
            yield client
    finally:
        log.close()
        _stop(procs)
        leftover = [p.pid for p in procs if p.poll() is None]
        assert not leftover, f"dask processes still alive: {leftover}"


def test_kv_moves_between_workers_over_ucxx(ucxx_cluster):
    client = ucxx_cluster
    workers = scheduler_identity(client)["workers"]
    by_name = {w["name"]: addr for addr, w in workers.items()}
    assert set(by_name) == {"prefill", "decode"}
    assert all(a.startswith("ucxx://") for a in by_name.values()), by_name

    # numpy callables: workers can import them (functions of this test module they could not)
    kv = client.submit(np.arange, N, dtype=np.float64, resources={"prefill": 1}, key="prefill-0")
    out = client.submit(np.add, kv, 1.0, resources={"decode": 1}, key="decode-0")
    result = out.result(timeout=60)
    np.testing.assert_array_equal(result, np.arange(N, dtype=np.float64) + 1.0)

    who_has = client.who_has([kv, out])
    assert by_name["prefill"] in who_has["prefill-0"]
    assert who_has["decode-0"] == (by_name["decode"],)

    log = client.run(lambda dask_worker: list(dask_worker.transfer_incoming_log),
                     workers=[by_name["decode"]])[by_name["decode"]]
    moved = [t for t in log if "prefill-0" in t["keys"]]
    assert moved, log
    assert moved[0]["who"] == by_name["prefill"]
    assert moved[0]["total"] >= N * 8
