"""Who may talk to the cluster: Dask TLS (mutual: every peer shows a certificate signed by the
cluster's CA), or nothing but loopback.

- The embedded cluster listens on 127.0.0.1 only (cluster.py), so without TLS only processes on
  this host can reach it. `--tls auto` adds TLS on top: a CA and certificate made for this job in
  memory (Dask's `Security.temporary`, built with `cryptography`), handed to the scheduler, the
  workers and the driver, and gone when the job ends. Nothing is written to disk.
- An existing (multi-node) cluster is started by the user with its own certificates
  (`dask scheduler --tls-ca-file ... --tls-cert ... --tls-key ...`, same for workers); the
  driver connects with `--tls-ca-file/--tls-cert/--tls-key` (or a job file's `[tls]` table).
  `require_encryption` makes Dask refuse any plain-tcp connection.
- A Slurm job (`pdbatch submit`) passes the job's files to the scheduler, every worker and the
  driver; with `tls = "auto"` it first writes a per-job CA and certificate into
  OUT/_pdbatch/tls/, readable by the submitting user only (`write_job_certificates`).
UCX traffic cannot be protected this way: see docs/security.md.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # config imports torch; slurm_job uses file_security without it
    from ..config import JobConfig

CERT_FILES = ("ca.pem", "cert.pem", "key.pem")


def job_security(cfg: JobConfig):
    """A distributed.Security for this job, or None when TLS is off."""
    if cfg.tls == "off":
        return None
    if cfg.tls == "auto":
        from distributed.security import Security

        return Security.temporary()
    return file_security(cfg.tls_ca_file, cfg.tls_cert, cfg.tls_key)


def file_security(ca_file: str, cert: str, key: str):
    """Mutual TLS from PEM files, the same certificate in every role (the embedded cluster's
    scheduler and workers, or a client)."""
    from distributed.security import Security

    return Security(require_encryption=True, tls_ca_file=ca_file,
                    tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key,
                    tls_worker_cert=cert, tls_worker_key=key)


def write_job_certificates(directory: str) -> tuple[str, str, str]:
    """A fresh CA and certificate for one job, as PEM files only the owner can read; kept if
    already there, so a resubmitted job (same output directory) keeps working. (ca, cert, key)."""
    paths = tuple(os.path.join(directory, name) for name in CERT_FILES)
    if all(os.path.isfile(p) for p in paths):
        return paths
    from distributed.security import Security

    sec = Security.temporary()  # self-signed: the certificate is its own CA
    os.makedirs(directory, mode=0o700, exist_ok=True)
    os.chmod(directory, 0o700)
    for path, pem in zip(paths, (sec.tls_ca_file, sec.tls_scheduler_cert, sec.tls_scheduler_key)):
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(pem)
    return paths
