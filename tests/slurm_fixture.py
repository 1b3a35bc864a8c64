"""A real one-node Slurm (munged + slurmctld + slurmd) for tests, as root.

Use the session-scoped ``slurm_cluster`` fixture (exposed in ``tests/conftest.py``). It yields a
:class:`SlurmCluster`; pass ``cluster.env`` to every Slurm client command you run::

    def test_x(slurm_cluster):
        job_id = slurm_cluster.sbatch("--wrap", "hostname")
        result = slurm_cluster.wait_job(job_id)
        assert result.state == "COMPLETED" and result.exit_code == 0

Everything lives in one temp dir: the munge key, munged's socket, slurm.conf, state, spool
and logs. The system's /etc/munge and /etc/slurm are neither read nor changed:
``AuthInfo=socket=...`` points both auth/munge and cred/munge at our private munged, and
``SLURM_CONF`` (in ``cluster.env``, inherited by batch jobs and their ``srun`` steps) points
every client at our slurm.conf. Ports are picked free at start, so two test sessions on one
machine do not collide.

Facts worth knowing (Debian 12, slurm-wlm 22.05.8, munge 0.5.15):
- munged refuses a socket whose parent dirs lack o+x, hence the 0711 dirs.
- ``sacct`` does not work: there is no slurmdbd (accounting_storage/none). Job outcomes come
  from ``scontrol show job`` (``MinJobAge`` keeps finished jobs for an hour) with the
  ``jobcomp/filetxt`` log (``cluster.jobcomp_log``) as a fallback.
- The node is the real short hostname, addressed as 127.0.0.1. SelectTypeParameters=CR_CPU:
  CPUs are the consumable; memory is not. The partition has OverSubscribe=FORCE:4: up to four
  jobs share each CPU, so the tests' jobs (2 CPUs each) run side by side instead of in turn.
- ``srun`` steps inside a batch job: a step without ``--exact`` takes the whole allocation,
  so long-running concurrent steps (a dask scheduler plus workers) wait on each other
  ("Requested nodes are busy") unless each uses ``--overlap``, or ``--exact`` with enough
  CPUs allocated (``-n``). ``srun -n 2`` in a 1-task job fails outright.
- Batch jobs inherit the submitter's environment (``--export=ALL``), SLURM_CONF included.
"""

from __future__ import annotations

import ctypes
import dataclasses
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

REQUIRED_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "scontrol", "squeue", "scancel")
TERMINAL_STATES = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "PREEMPTED",
    "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE",
}


@dataclasses.dataclass
class JobResult:
    job_id: str
    state: str  # e.g. COMPLETED, FAILED, CANCELLED, TIMEOUT
    exit_code: int  # the batch script's exit status
    signal: int  # the signal that killed it, 0 if none
    info: dict  # every Key=Value of `scontrol show job -o` (or of the jobcomp line)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child before exec: if pytest dies without teardown, the daemon gets SIGTERM.
    PR_SET_PDEATHSIG = 1
    ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _parse_kv(line: str) -> dict:
    return dict(m.groups() for m in re.finditer(r"(\w+)=(\S*)", line))


def _node_hardware(env: dict) -> dict:
    """CPUs / topology / RealMemory as slurmd itself detects them."""
    out = subprocess.run(["slurmd", "-C"], env=env, capture_output=True, text=True,
                         check=True).stdout
    hw = _parse_kv(out.splitlines()[0])
    keep = ("CPUs", "Boards", "SocketsPerBoard", "CoresPerSocket", "ThreadsPerCore", "RealMemory")
    return {k: hw[k] for k in keep if k in hw}


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.nodename = socket.gethostname().split(".")[0]
        self.conf = root / "slurm.conf"
        self.munge_socket = root / "munge" / "munge.socket"
        self.jobcomp_log = root / "jobcomp.log"
        self.log_dir = root / "log"
        self.env = dict(os.environ)
        self.env["SLURM_CONF"] = str(self.conf)
        # munged, slurmctld and slurmd live in /usr/sbin, which a non-root PATH often lacks
        self.env["PATH"] = os.pathsep.join([self.env.get("PATH", ""), "/usr/sbin", "/sbin"])
        self._procs: dict[str, subprocess.Popen] = {}

    # ---- lifecycle -------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        missing = [b for b in REQUIRED_BINARIES if shutil.which(b, path=self.env["PATH"]) is None]
        if missing:
            pytest.fail(
                f"Slurm/munge binaries missing ({', '.join(missing)}): run `bash scripts/test.sh` "
                "(it installs slurm-wlm and munge) instead of bare pytest.", pytrace=False)
        if os.geteuid() != 0:
            pytest.fail("the one-node Slurm test cluster must run as root (SlurmUser=root)",
                        pytrace=False)
        for d in ("munge", "state", "spool", "log"):
            (self.root / d).mkdir(mode=0o711)
        self.root.chmod(0o711)  # munged wants o+x on every dir above its socket
        self._start_munged()
        self._write_conf()
        self._spawn("slurmctld", ["slurmctld", "-D", "-f", str(self.conf)])
        self._spawn("slurmd", ["slurmd", "-D", "-f", str(self.conf), "-N", self.nodename])
        self._wait_idle(timeout)

    def stop(self) -> None:
        seen = set(self._cluster_pids())  # slurmstepd and job processes, to wait for below
        # 1. cancel whatever is still queued or running, so slurmd tears the job steps down
        if "slurmctld" in self._procs and self._procs["slurmctld"].poll() is None:
            try:
                jobs = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                if jobs:
                    self.run(["scancel", "--full", *jobs], check=False)
                    deadline = time.monotonic() + 20
                    while time.monotonic() < deadline and self.run(
                            ["squeue", "-h", "-o", "%i"], check=False).stdout.split():
                        time.sleep(0.5)
            except subprocess.TimeoutExpired:
                pass  # slurmctld unresponsive: the steps below still kill everything by PID
        # 2. our daemons, newest first, by PID
        for name in ("slurmd", "slurmctld", "munged"):
            proc = self._procs.pop(name, None)
            if proc is not None:
                _terminate(proc)
        # 3. stragglers of *this* cluster (slurmstepd, job processes): they carry our SLURM_CONF
        for sig in (signal.SIGTERM, signal.SIGKILL):
            live = self._cluster_pids()
            seen.update(live)
            for pid in live:
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
            if _wait_gone(live, 5):
                break
        # 4. orphans are reaped by init; wait for that so `ps` is clean when we return
        _wait_gone(seen, 10, zombies_too=True)
        shutil.rmtree(self.root, ignore_errors=True)

    # ---- client helpers --------------------------------------------------------------------
    def run(self, cmd, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command (or anything) with this cluster's environment."""
        return subprocess.run(cmd, env=self.env, capture_output=True, text=True, check=check,
                              timeout=kw.pop("timeout", 60), **kw)

    def sbatch(self, *args: str, cwd=None) -> str:
        """`sbatch --parsable ARGS...`; returns the job id."""
        r = self.run(["sbatch", "--parsable", *args], cwd=cwd, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"sbatch {' '.join(args)} failed ({r.returncode}): {r.stderr}")
        return r.stdout.strip().split(";")[0]

    def job_info(self, job_id: str) -> dict | None:
        """`scontrol show job -o` as a dict, or the jobcomp record once slurmctld forgot it."""
        r = self.run(["scontrol", "show", "job", "-o", str(job_id)], check=False)
        if r.returncode == 0 and r.stdout.strip():
            return _parse_kv(r.stdout)
        if self.jobcomp_log.exists():
            for line in self.jobcomp_log.read_text().splitlines():
                info = _parse_kv(line)
                if info.get("JobId") == str(job_id):
                    return info
        return None

    def wait_job(self, job_id: str, timeout: float = 120.0, poll: float = 0.5) -> JobResult:
        """Block until the job reaches a terminal state; return state and exit code."""
        deadline = time.monotonic() + timeout
        info = None
        while time.monotonic() < deadline:
            info = self.job_info(job_id)
            if info and info.get("JobState") in TERMINAL_STATES:
                code, _, sig = info.get("ExitCode", "0:0").partition(":")
                return JobResult(str(job_id), info["JobState"], int(code), int(sig or 0), info)
            time.sleep(poll)
        raise TimeoutError(f"job {job_id} not finished after {timeout}s; last info: {info}\n"
                           + self.logs_tail())

    def logs_tail(self, n: int = 30) -> str:
        parts = []
        for f in sorted(self.log_dir.glob("*.log")):
            lines = f.read_text(errors="replace").splitlines()[-n:]
            parts.append(f"--- {f.name} ---\n" + "\n".join(lines))
        return "\n".join(parts)

    # ---- internals -------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list[str]) -> None:
        log = open(self.log_dir / f"{name}.out", "wb")
        self._procs[name] = subprocess.Popen(
            cmd, env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            cwd=self.root, start_new_session=True, preexec_fn=_die_with_parent)
        log.close()

    def _start_munged(self) -> None:
        key = self.root / "munge" / "munge.key"
        fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, os.urandom(1024))
        os.close(fd)
        m = self.root / "munge"
        self._spawn("munged", [
            "munged", "-F", f"--socket={self.munge_socket}", f"--key-file={key}",
            f"--pid-file={m / 'munged.pid'}", f"--seed-file={m / 'munged.seed'}",
            f"--log-file={self.log_dir / 'munged.log'}"])
        deadline = time.monotonic() + 15
        while not self.munge_socket.exists():
            if self._procs["munged"].poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("munged did not start:\n"
                                   + (self.log_dir / "munged.out").read_text(errors="replace"))
            time.sleep(0.05)

    def _write_conf(self) -> None:
        hw = " ".join(f"{k}={v}" for k, v in _node_hardware(self.env).items())
        r, log = self.root, self.log_dir
        ctld_port = _free_port()
        slurmd_port = _free_port()
        while slurmd_port == ctld_port:
            slurmd_port = _free_port()
        self.conf.write_text(f"""\
# one-node test cluster written by tests/slurm_fixture.py
ClusterName=pdbatch-test
SlurmctldHost={self.nodename}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={log / 'slurmctld.log'}
SlurmdLogFile={log / 'slurmd.log'}
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/filetxt
JobCompLoc={self.jobcomp_log}
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
MinJobAge=3600
SlurmdParameters=config_overrides
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
NodeName={self.nodename} NodeAddr=127.0.0.1 {hw} State=UNKNOWN
PartitionName=debug Nodes={self.nodename} Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:4
""")

    def _wait_idle(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last = ""
        while time.monotonic() < deadline:
            for name, proc in self._procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs_tail()}")
            r = self.run(["sinfo", "-h", "-N", "-o", "%N %t"], check=False, timeout=10)
            last = (r.stdout + r.stderr).strip()
            if r.returncode == 0 and last.split()[-1:] == ["idle"]:
                return
            time.sleep(0.3)
        raise RuntimeError(f"node not idle after {timeout}s (sinfo: {last!r})\n{self.logs_tail()}")

    def _cluster_pids(self) -> list[int]:
        """Live processes (other than us) whose environment has this cluster's SLURM_CONF."""
        marker = f"SLURM_CONF={self.conf}".encode()
        pids = []
        for p in Path("/proc").iterdir():
            if not p.name.isdigit() or int(p.name) == os.getpid():
                continue
            try:
                if marker in (p / "environ").read_bytes().split(b"\0"):
                    pids.append(int(p.name))
            except OSError:
                continue
        return pids


def _wait_gone(pids, timeout: float, zombies_too: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        pids = [p for p in pids if Path(f"/proc/{p}").exists()
                and (zombies_too or not _is_zombie(p))]
        if not pids:
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)


def _is_zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _terminate(proc: subprocess.Popen, timeout: float = 15.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running one-node Slurm; yields a SlurmCluster (use ``.env``, ``.sbatch``,
    ``.wait_job``). Fails (does not skip) when Slurm is not installed."""
    root = Path(tempfile.mkdtemp(prefix="pdbatch-slurm-"))
    cluster = SlurmCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
