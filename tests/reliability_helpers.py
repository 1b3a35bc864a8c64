"""Helpers for the reliability tests: a Dask cluster of separate processes that a test can hurt
(SIGKILL, SIGSTOP) by PID, a driver started in the background, per-process memory sampling, and
the checks every scenario ends with (one row per input row, equal to Hugging Face greedy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
from fixtures_models import hf_greedy
from pipeline_helpers import PDBATCH, REPO, manifest_units, read_rows, session_processes, wait_session_empty


class ProcCluster:
    """`dask scheduler` and `dask worker --no-nanny` processes on 127.0.0.1: with no nanny the
    process a test kills IS the worker, and nothing restarts it behind the test's back."""

    def __init__(self, tmp_path: Path, tls: tuple[str, str, str] | None = None):
        self.dir = tmp_path
        # with TLS: every process speaks tls:// with the cluster's certificate (`dask --tls-*`)
        self.tls_args = ["--tls-ca-file", tls[0], "--tls-cert", tls[1], "--tls-key", tls[2]] if tls else []
        self.scheduler_file = tmp_path / "scheduler.json"
        self.procs: dict[str, subprocess.Popen] = {}
        self.env = {**os.environ, "DASK_DISTRIBUTED__WORKER__DAEMON": "False", "OMP_NUM_THREADS": "1",
                    "TOKENIZERS_PARALLELISM": "false", "PDBATCH_TEST_GATE": str(tmp_path / "gate")}

    def _start(self, name: str, *cmd: str) -> subprocess.Popen:
        log = open(self.dir / f"{name}.log", "w")
        p = subprocess.Popen([sys.executable, "-m", *cmd], cwd=REPO, env=self.env, start_new_session=True,
                             stdout=log, stderr=subprocess.STDOUT)
        self.procs[name] = p
        return p

    def start_scheduler(self) -> None:
        self._start("scheduler", "distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0",
                    "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(self.scheduler_file),
                    *(["--protocol", "tls", *self.tls_args] if self.tls_args else []))
        deadline = time.time() + 60
        while not self.scheduler_file.exists():
            assert time.time() < deadline, "scheduler did not start"
            time.sleep(0.1)

    def add_worker(self, name: str, role: str, gated: bool = False) -> subprocess.Popen:
        """gated: the worker pays its imports now but registers only once open_gate() is called
        (tests/gated_worker_preload.py): a replacement that joins late without a late start."""
        gate = ["--preload", str(REPO / "tests" / "gated_worker_preload.py")] if gated else []
        return self._start(name, "distributed.cli.dask_worker", "--scheduler-file", str(self.scheduler_file),
                           "--nthreads", "1", "--host", "127.0.0.1", "--no-dashboard",
                           "--dashboard-address", "127.0.0.1:0", "--memory-limit", "0",
                           "--no-nanny", "--name", name, "--resources", f"{role}=1", *gate, *self.tls_args)

    def gate_ready(self) -> bool:
        """Whether a gated worker has paid its imports and now waits for open_gate()."""
        return (self.dir / "gate.ready").exists()

    def open_gate(self) -> None:
        (self.dir / "gate").touch()

    def start(self, workers: dict[str, str]) -> None:
        """The scheduler, then a worker per {name: role}."""
        self.start_scheduler()
        for name, role in workers.items():
            self.add_worker(name, role)

    def signal(self, name: str, sig: int) -> None:
        os.kill(self.procs[name].pid, sig)

    def kill(self, name: str) -> float:
        """SIGKILL the worker; returns the time it was sent."""
        self.signal(name, signal.SIGKILL)
        self.procs[name].wait(timeout=30)
        return time.time()

    def client(self):
        from distributed import Client

        return Client(scheduler_file=str(self.scheduler_file), timeout=30)

    def client_tls(self, security):
        from distributed import Client

        return Client(scheduler_file=str(self.scheduler_file), timeout=30, security=security)

    def close(self) -> None:
        # workers first: a worker whose scheduler is gone waits for it before giving up
        order = [n for n in self.procs if n != "scheduler"] + [n for n in self.procs if n == "scheduler"]
        for name in order:
            p = self.procs[name]
            if p.poll() is None:
                try:
                    os.kill(p.pid, signal.SIGCONT)  # a stopped process cannot act on SIGTERM
                    p.terminate()
                except ProcessLookupError:
                    pass
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(timeout=20)
        for p in self.procs.values():
            wait_session_empty(p.pid)


class Driver:
    """`pdbatch run` in the background, in its own session (so its workers can be found)."""

    def __init__(self, *args, env: dict | None = None):
        self.proc = subprocess.Popen([*PDBATCH, *map(str, args)], cwd=REPO, start_new_session=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, **(env or {})})
        self.stderr = ""

    def wait_units(self, out: Path, n: int, timeout: float = 180) -> None:
        deadline = time.time() + timeout
        while len(manifest_units(out)) < n:
            assert self.proc.poll() is None, f"driver exited early: {self.proc.stderr.read()}"
            assert time.time() < deadline, f"fewer than {n} units done in {timeout}s"
            time.sleep(0.05)

    def stop(self) -> None:
        """For `finally:` after a failed assertion: end the driver (and what it started)."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        wait_session_empty(self.proc.pid)

    def finish(self, timeout: float = 300) -> int:
        try:
            _, self.stderr = self.proc.communicate(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
        wait_session_empty(self.proc.pid)
        return self.proc.returncode


class PeakRSS:
    """Samples the RSS of every process in a session (10 Hz) and keeps each PID's peak."""

    def __init__(self, sid: int, every_s: float = 0.1):
        self.sid, self.every_s = sid, every_s
        self.peak: dict[int, int] = {}
        self.cmd: dict[int, str] = {}
        self.listening: set[tuple[int, str, int]] = set()  # (pid, ip, port)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for p in session_processes(self.sid):
                try:
                    rss = p.memory_info().rss
                    self.peak[p.pid] = max(self.peak.get(p.pid, 0), rss)
                    for c in p.net_connections(kind="inet"):
                        if c.status == psutil.CONN_LISTEN:
                            self.listening.add((p.pid, c.laddr.ip, c.laddr.port))
                except psutil.Error:
                    pass
            self._stop.wait(self.every_s)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


def reference(tiny, prompt: str, n: int, ignore_eos: bool = True) -> list[int]:
    """Hugging Face `generate`, greedy, one prompt at a time: what a clean run produces."""
    ids = tiny.tokenizer(prompt)["input_ids"]
    return hf_greedy(tiny, ids, n, stop_at_eos=not ignore_eos)


def assert_complete_and_correct(out: Path, prompts: list[str], expected: dict[str, list[int]],
                                units: int) -> list[dict]:
    """Each input row exactly once, every token equal to the reference, each unit written once."""
    rows = read_rows(out)
    assert [r["id"] for r in rows] == sorted(expected), "each input row exactly once"
    for r in rows:
        assert r["error"] is None, r
        assert r["output_token_ids"] == expected[r["id"]], r["id"]
    done = manifest_units(out)
    assert len(done) == len(set(done)) == units, "each unit recorded exactly once"
    assert len(list(out.glob("part-*.parquet"))) == units and not list(out.glob(".tmp-*"))
    assert (out / "_SUCCESS").exists()
    return rows


def report(out: Path) -> dict:
    return json.loads((out / "_pdbatch" / "report.json").read_text())


def record(name: str, **figures) -> None:
    """Measured figures, printed (pytest -s) and appended to $PDBATCH_RELIABILITY_LOG if set."""
    line = json.dumps({"scenario": name, **figures})
    print(line)
    path = os.environ.get("PDBATCH_RELIABILITY_LOG")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def make_tls_files(directory: Path, name: str = "cluster") -> tuple[str, str, str]:
    """A CA and a certificate it signed (what an admin makes for a multi-node cluster):
    returns (ca.pem, cert.pem, key.pem)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def cert(subject, issuer, key, signing_key, ca: bool):
        return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
                .sign(signing_key, hashes.SHA256()))

    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} CA")])
    leaf_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    paths = [directory / f"{name}-ca.pem", directory / f"{name}-cert.pem", directory / f"{name}-key.pem"]
    pem = serialization.Encoding.PEM
    paths[0].write_bytes(cert(ca_name, ca_name, ca_key, ca_key, True).public_bytes(pem))
    paths[1].write_bytes(cert(leaf_name, ca_name, key, ca_key, False).public_bytes(pem))
    paths[2].write_bytes(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    paths[2].chmod(0o600)
    return tuple(str(p) for p in paths)
