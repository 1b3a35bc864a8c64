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
UCX traffic cannot be protected this way: see docs/security.md.
"""

from __future__ import annotations

from .config import JobConfig


def job_security(cfg: JobConfig):
    """A distributed.Security for this job, or None when TLS is off."""
    if cfg.tls == "off":
        return None
    from distributed.security import Security

    if cfg.tls == "auto":
        return Security.temporary()
    return Security(require_encryption=True, tls_ca_file=cfg.tls_ca_file,
                    tls_client_cert=cfg.tls_cert, tls_client_key=cfg.tls_key,
                    # the embedded cluster (if any) runs with the same certificate in every role
                    tls_scheduler_cert=cfg.tls_cert, tls_scheduler_key=cfg.tls_key,
                    tls_worker_cert=cfg.tls_cert, tls_worker_key=cfg.tls_key)
