"""What the batch script (slurm/pdbatch.sbatch) runs on the first node between its steps.

    python -m pdbatch.slurm.job wait --scheduler-file F --workers N [NAME=PID ...]
        block until N workers have registered; exit 1 with a log line naming the step that
        died, or what never came up, so a broken job fails fast instead of idling
    python -m pdbatch.slurm.job stop --scheduler-file F
        close the scheduler and, through it, every worker: their steps then end by themselves

Only Dask is imported here (not torch), so these add seconds, not tens of seconds, to a job.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import time
from pathlib import Path


def wait_for_cluster(scheduler_file: str, workers: int, timeout: float, protocol: str,
                     steps: dict[str, int], tls: tuple[str, str, str] | None = None) -> int:
    """Block until `workers` workers have registered; 1 with a log line naming what went wrong."""
    from ..driver.cluster import scheduler_identity

    def say(msg):
        print(f"pdbatch-slurm: {time.strftime('%H:%M:%S')} {msg}", flush=True)

    deadline = time.monotonic() + timeout
    client = None
    seen = 0
    try:
        while time.monotonic() < deadline:
            dead = [name for name, pid in steps.items() if not _alive(pid)]
            if dead:
                say(f"error: the {dead[0]} step ended before the cluster was up (its messages are above)")
                return 1
            if client is None and _scheduler_ready(scheduler_file):
                client = _connect(scheduler_file, protocol, tls=tls)
            if client is not None:
                info = scheduler_identity(client)
                seen = len(info["workers"])
                if seen >= workers:
                    roles = {}
                    for w in info["workers"].values():
                        for r in w.get("resources", {}):
                            roles[r] = roles.get(r, 0) + 1
                    say(f"cluster up: {seen} workers ({', '.join(f'{n} {r}' for r, n in sorted(roles.items()))}), "
                        f"scheduler {info['address']}")
                    _say_dashboard(scheduler_file, say)
                    return 0
            time.sleep(1.0)
    finally:
        if client is not None:
            client.close()
    missing = "the scheduler file never appeared" if client is None else f"only {seen} of {workers} workers registered"
    say(f"error: cluster not up after {timeout:.0f}s: {missing} (see the messages above)")
    return 1


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            pass
        return True
    return state not in ("Z", "X")


def _scheduler_ready(path: str) -> bool:
    try:
        with open(path) as f:
            return "address" in json.load(f)
    except (OSError, ValueError):
        return False  # not there yet, or being written


def _connect(scheduler_file: str, protocol: str, timeout: float = 60, tls: tuple[str, str, str] | None = None):
    from distributed import Client

    from ..driver.security import file_security

    if protocol == "ucxx":
        import distributed_ucxx  # noqa: F401  (registers the ucxx comm)
    return Client(scheduler_file=scheduler_file, timeout=timeout,
                  security=file_security(*tls) if tls else None)


def _say_dashboard(scheduler_file: str, say) -> None:
    with open(scheduler_file) as f:
        port = json.load(f).get("services", {}).get("dashboard")
    if not port:
        return
    node = os.environ.get("SLURMD_NODENAME") or socket.gethostname().split(".")[0]
    login = os.environ.get("SLURM_SUBMIT_HOST", "LOGIN-NODE")
    say(f"dashboard http://{node}:{port}/status; from your machine: ssh -N -L {port}:{node}:{port} {login} "
        f"and open http://localhost:{port}/status")


def stop_cluster(scheduler_file: str, protocol: str, tls: tuple[str, str, str] | None = None) -> int:
    """Close the scheduler and, through it, every worker (their steps then end by themselves)."""
    if not _scheduler_ready(scheduler_file):
        return 1
    try:
        client = _connect(scheduler_file, protocol, timeout=10, tls=tls)
        client.shutdown()
    except Exception as e:  # the batch script falls back to signalling the steps
        print(f"pdbatch-slurm: could not close the cluster through Dask ({e})", flush=True)
        return 1
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pdbatch.slurm.job", description="helpers the batch script calls")
    sub = parser.add_subparsers(dest="command", required=True)
    w = sub.add_parser("wait", help="wait until every worker has registered with the scheduler")
    w.add_argument("--scheduler-file", required=True)
    w.add_argument("--workers", type=int, required=True)
    w.add_argument("--timeout", type=float, default=600)
    w.add_argument("--protocol", default="tcp")
    w.add_argument("steps", nargs="*", help="NAME=PID of each step's srun (a dead one ends the wait)")
    st = sub.add_parser("stop", help="close the scheduler and its workers")
    st.add_argument("--scheduler-file", required=True)
    st.add_argument("--protocol", default="tcp")
    for p in (w, st):  # the job's TLS files, when it runs with TLS
        p.add_argument("--tls-ca-file")
        p.add_argument("--tls-cert")
        p.add_argument("--tls-key")
    args = parser.parse_args(argv)
    tls = (args.tls_ca_file, args.tls_cert, args.tls_key) if args.tls_ca_file else None
    if args.command == "stop":
        return stop_cluster(args.scheduler_file, args.protocol, tls)
    steps = dict(s.rsplit("=", 1) for s in args.steps)
    return wait_for_cluster(args.scheduler_file, args.workers, args.timeout, args.protocol,
                            {name: int(pid) for name, pid in steps.items()}, tls)


if __name__ == "__main__":
    sys.exit(main())
