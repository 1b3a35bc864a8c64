"""Running the real `pdbatch` CLI in a subprocess (its own session, so every process it
started can be found and checked afterwards) and reading its output."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from fixtures_models import hf_greedy

REPO = Path(__file__).resolve().parent.parent
SAMPLE = str(REPO / "data" / "sample.parquet")
DEFAULT_MODEL = str(REPO / "data" / "tiny-llama")
PDBATCH = [sys.executable, "-m", "pdbatch.cli"]


def session_processes(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
    return out


def wait_for(predicate, timeout: float, what: str, every: float = 0.05):
    """Poll `predicate` until it returns something truthy (returned), failing after `timeout` s."""
    deadline = time.time() + timeout
    while True:
        value = predicate()
        if value:
            return value
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)


def wait_task_states(worker, timeout: float = 30, **states) -> None:
    """Until each named task is in the given state on `worker` (an in-process Dask worker)."""
    wait_for(lambda: all(k in worker.state.tasks and worker.state.tasks[k].state == v for k, v in states.items()),
             timeout, f"task states {states}", every=0.01)


def hold_thread(event: str) -> float:
    """A running prefill stand-in for a one-thread Dask worker: holds the thread until the test
    sets the Dask Event `event`; returns when it let go."""
    from distributed import Event

    assert Event(event).wait(60)
    return time.time()


def wait_session_empty(sid: int, timeout: float = 60) -> None:
    """Every process the run started (workers, nannies) must be gone after it exits."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        left = session_processes(sid)
        if not left:
            return
        time.sleep(0.5)
    raise AssertionError(f"processes left behind by pdbatch: {[p.cmdline() for p in left]}")


def run_cli(*args, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_clis(args, timeout=timeout, env=env)[0]


def run_clis(*arg_lists, timeout: float = 300, env: dict | None = None,
             envs: list[dict | None] | None = None) -> list[subprocess.CompletedProcess]:
    """Independent `pdbatch` runs side by side (a run alone leaves much of the two cores idle
    while its processes start), each in its own session; every process each one started must
    be gone after it exits. `envs`: one more environment per run, over `env`."""
    envs = envs or [None] * len(arg_lists)
    procs = [subprocess.Popen([*PDBATCH, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, start_new_session=True, cwd=REPO,
                              env={**os.environ, **(env or {}), **(extra or {})})
             for args, extra in zip(arg_lists, envs, strict=True)]
    deadline = time.time() + timeout
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=max(1.0, deadline - time.time()))
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
        for proc in procs:
            wait_session_empty(proc.pid)
    return results


def read_rows(out: str | Path) -> list[dict]:
    rows = ds.dataset(str(out), format="parquet").to_table().to_pylist()
    return sorted(rows, key=lambda r: r["id"])


def read_report(out: str | Path) -> dict:
    return json.loads((Path(out) / "_pdbatch" / "report.json").read_text())


def manifest_units(out: str | Path) -> list[str]:
    path = Path(out) / "_pdbatch" / "manifest.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["unit"] for line in path.read_text().splitlines() if line.strip()]


def text_reference(lm, prompt: str, max_new_tokens: int) -> list[int]:
    """HF greedy generate for a text prompt, stopping at EOS like a pdbatch run."""
    return hf_greedy(lm, lm.tokenizer(prompt)["input_ids"], max_new_tokens, stop_at_eos=True)


def assert_sample_matches_hf(out: str | Path, lm, max_new_tokens: int, fixed_roles: bool = False) -> list[dict]:
    """A run of data/sample.parquet (ids from its `id` column): each id exactly once, no errors,
    every row token-identical to HF generate, each phase recorded with a worker of the job; with
    `fixed_roles` (--no-rebalance), prefill on a prefill worker and decode on a decode worker."""
    rows = read_rows(out)
    src = pq.read_table(SAMPLE).to_pylist()
    assert sorted(r["id"] for r in rows) == sorted(r["id"] for r in src)  # each id exactly once
    by_id = {r["id"]: r for r in rows}
    for s in src:
        r = by_id[s["id"]]
        assert r["error"] is None, r["error"]
        assert r["output_token_ids"] == text_reference(lm, s["prompt"], max_new_tokens), s["id"]
        if fixed_roles:
            assert r["prefill_worker"].startswith("prefill-") and r["decode_worker"].startswith("decode-")
            assert r["prefill_worker"] != r["decode_worker"]
        else:  # rebalancing: any worker may do either phase, and both are recorded
            assert r["prefill_worker"].startswith(("prefill-", "decode-"))
            assert r["decode_worker"].startswith(("prefill-", "decode-"))
    return rows
