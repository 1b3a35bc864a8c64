"""Getting a Dask cluster: the embedded local one, or an existing scheduler.

The embedded cluster is a scheduler in the driver process plus separate worker processes
(Nannies), each started with its role as a resource (`prefill=1` or `decode=1`): roles are
fixed at start, never changed on a live worker. It listens on loopback only.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import dask

from ..config import JobConfig, parse_size
from ..errors import UserError

# Above the Nanny's own close timeout (driver/nanny.py), so a slow worker is killed, not orphaned.
CLUSTER_CLOSE_TIMEOUT_S = 90.0
# UCX on a CPU host runs over TCP; the memtype-cache warning is harmless noise (DESIGN.md).
UCX_CPU_ENV = {"UCX_TLS": "tcp", "UCX_WARN_UNUSED_ENV_VARS": "n", "UCX_MEMTYPE_CACHE": "n"}


def resolve_protocol(cfg: JobConfig, gpus: int) -> str:
    if cfg.protocol != "auto":
        return cfg.protocol
    return "ucxx" if gpus else "tcp"


def ensure_ucxx(protocol: str, gpus: int) -> None:
    if protocol != "ucxx":
        return
    try:
        import distributed_ucxx  # noqa: F401  (registers the "ucxx" comm backend)
    except ImportError:
        raise UserError("--protocol ucxx needs UCXX: pip install 'pdbatch[ucx]' "
                        "(distributed-ucxx-cu12 or -cu13)") from None
    if not gpus:
        for k, v in UCX_CPU_ENV.items():
            os.environ.setdefault(k, v)


def gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:
        return 0


def worker_threads(cfg: JobConfig, workers: int) -> int:
    return cfg.threads_per_worker or max(1, (os.cpu_count() or 1) // max(1, workers))


# Dask keeps the last N messages of every batched stream for debugging, each one whole if under
# 1 MB: the client's `update-graph` messages and the scheduler's `compute-task` messages carry
# each unit's input rows, so with the default N = 1000 the driver (client and embedded scheduler)
# grew by every unit's rows until 1000 units had passed (measured: +24 MiB over 200k short rows;
# long prompts make it hundreds). N also bounds the scheduler's transition log and the workers'
# transfer logs, from which pdbatch reads only the latest transfer's time
# (early_decode.transfer_seconds) and the GPU check a sample of bandwidths; bytes moved come from
# running totals (worker.sent_transfer_bytes).
LOW_LEVEL_LOG_LENGTH = 16


class _DropClosedClientGathers(logging.Filter):
    """A gather still waiting when the client closes (e.g. a result the driver gave up on after
    RESULT_TIMEOUT_S, its unit restarted) ends its task with Dask's AllExit, which asyncio reports
    as "Task exception was never retrieved" with a traceback, after the run's last line. Nothing
    is lost there: drop that record only."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not (exc is not None and type(exc).__name__ == "AllExit"
                    and type(exc).__module__.startswith("distributed"))


def quiet_dask_logs() -> None:
    if not any(isinstance(f, _DropClosedClientGathers) for f in logging.getLogger("asyncio").filters):
        logging.getLogger("asyncio").addFilter(_DropClosedClientGathers())
    dask.config.set({"distributed.admin.log-format": "%(name)s - %(levelname)s - %(message)s",
                     "distributed.admin.low-level-log-length": LOW_LEVEL_LOG_LENGTH})
    for name in ("distributed", "distributed.nanny", "distributed.scheduler", "distributed.worker",
                 "distributed.core", "distributed.http.proxy", "bokeh", "bokeh.server.util"):
        logging.getLogger(name).setLevel(logging.ERROR if name.startswith("bokeh") else logging.WARNING)


def worker_specs(cfg: JobConfig, protocol: str, threads: int, gpus: int = 0, security=None) -> dict:
    """One Nanny (a separate worker process) per worker, its role given as a resource at start.
    With GPUs, each worker gets its own GPU (dask-cuda style), shared round-robin if fewer."""
    from .nanny import JobNanny

    roles = [("prefill", i) for i in range(cfg.prefill_workers)] + \
            [("decode", i) for i in range(cfg.decode_workers)]
    specs = {}
    for index, (role, i) in enumerate(roles):
        options = {
            "nthreads": 1, "resources": {role: 1}, "host": "127.0.0.1", "protocol": protocol,
            # with a limit, the nanny restarts a worker that outgrows it (a runaway row), and the
            # driver redoes that worker's units (pipeline.py, quarantine.py)
            "memory_limit": parse_size(cfg.worker_memory_limit), "dashboard": False,
            "silence_logs": logging.WARNING,
            # if the driver is SIGKILLed, orphaned workers give up and exit instead of lingering
            "death_timeout": 60,
            "env": {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
                    "TOKENIZERS_PARALLELISM": "false"}}
        if gpus:
            from .gpu import gpu_worker_options

            extra = gpu_worker_options(index, gpus, cfg.rmm_pool_size)
            options["env"].update(extra.pop("env"))
            options.update(extra)
        if security is not None:
            options["security"] = security
        specs[f"{role}-{i}"] = {"cls": JobNanny, "options": options}
    return specs


@contextlib.contextmanager
def engine_pre_spawn_environ(cfg: JobConfig):
    """The engine's worker environment (Engine.worker_environment: LD_PRELOAD for vLLM on CPU)
    from each worker process's start. A Nanny's `env=` is applied inside the worker once it
    runs, too late for LD_PRELOAD; Dask's pre-spawn environment, read when a Nanny is made, is
    copied into this process's environment just before it spawns (and respawns) its worker.
    preserved_environ puts this process's own environment back once the cluster is gone."""
    from ..engines import engine_class

    extra = engine_class(cfg.engine).worker_environment(cfg.engine_options())
    if not extra:
        yield
        return
    env = {**dask.config.get("distributed.nanny.pre-spawn-environ", default={}), **extra}
    with dask.config.set({"distributed.nanny.pre-spawn-environ": env}):
        yield


# What a worker process imports before it can take work: ~10 s of CPU each on a 2-core VM.
FORKSERVER_PRELOAD = ["distributed", "pdbatch.driver.worker", "pdbatch.engines.builtin"]


def _forkserver_fits(cfg: JobConfig, gpus: int = 0) -> bool:
    """Built-in engine, embedded cluster, CPU, tcp/tls. Not for vLLM (its LD_PRELOAD must be
    there from each process's start), GPUs (dask-cuda spawns) or UCXX (UCX reads the variables
    the driver sets for it when the worker starts)."""
    return (cfg.engine == "builtin" and not cfg.existing_cluster and not gpus and cfg.device != "cuda"
            and cfg.protocol in ("auto", "tcp"))


@contextlib.contextmanager
def _forkserver_method():
    from distributed.utils import get_mp_context

    with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
        get_mp_context().set_forkserver_preload(FORKSERVER_PRELOAD)  # after Dask set its own list
        yield


def start_worker_forkserver(cfg: JobConfig) -> None:
    """Start now, while the driver checks the model, the process the embedded workers fork from
    (worker_start_method). It takes the environment a Nanny gives the workers it spawns (Dask's
    pre-spawn environment), since forked workers inherit its environment, not the driver's."""
    if not _forkserver_fits(cfg):
        return
    import multiprocessing.forkserver

    env = {k: str(v) for k, v in dask.config.get("distributed.nanny.pre-spawn-environ", default={}).items()}
    if env.get("PYTHONHASHSEED") in (None, "0"):
        env["PYTHONHASHSEED"] = "6640"  # what a Nanny sets: the same hash seed in every worker
    with preserved_environ(), _forkserver_method():
        os.environ.update(env)
        multiprocessing.forkserver.ensure_running()


@contextlib.contextmanager
def worker_start_method(cfg: JobConfig, gpus: int):
    """Where it fits (_forkserver_fits), workers fork from a forkserver that imported torch,
    transformers and the engine once, instead of each importing them (a respawned worker too):
    the sample job's processes took 42 s of CPU instead of 65. The forkserver is a fresh,
    single-threaded process, so forking from it is safe; a worker's thread count is set when
    its engine is built (an OpenMP loaded before would not read OMP_NUM_THREADS again)."""
    if not _forkserver_fits(cfg, gpus):
        yield
        return
    with _forkserver_method():
        yield


@contextlib.contextmanager
def preserved_environ():
    """This process's environment as it was, once the embedded cluster is gone. A Nanny copies
    Dask's pre-spawn environment (OMP_NUM_THREADS=1, MKL_NUM_THREADS=1, ..., PYTHONHASHSEED)
    into its own process's os.environ before each (re)spawn; in the driver that would leak into
    whatever it starts after the job (pdbatch bench's vLLM baseline ran on one OpenMP thread)."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        for k in [k for k in os.environ if k not in saved]:
            del os.environ[k]
        os.environ.update(saved)


def _scheduler_file_address(path: str | None) -> str:
    try:
        with open(path) as f:
            return str(json.load(f).get("address", ""))
    except (OSError, ValueError, TypeError, AttributeError):
        return ""  # Client() reports an unreadable scheduler file itself


def scheduler_identity(client) -> dict:
    """The scheduler's identity with every worker, asked afresh.

    Not `client.scheduler_info(n_workers=-1)`: that one fetches into a cache that the client's
    own periodic refresh (every 2 s, workers left out) also writes, and returns the cache, so a
    refresh landing in between hands back no workers at all (89 of 12,576 calls with the refresh
    every 20 ms), which the pipeline read as every worker leaving at once."""
    return client.sync(client.scheduler.identity, n_workers=-1)


@contextlib.contextmanager
def connect(cfg: JobConfig):
    """Yield (client, protocol, dashboard_link) and shut the embedded cluster down at exit."""
    from distributed import Client, Scheduler, SpecCluster

    from .security import job_security

    quiet_dask_logs()
    gpus = gpu_count()
    security = job_security(cfg)
    if cfg.existing_cluster:
        if cfg.scheduler_file and not os.path.isfile(cfg.scheduler_file):
            raise UserError(f"scheduler file not found: {cfg.scheduler_file}")
        address = cfg.scheduler_address or _scheduler_file_address(cfg.scheduler_file)
        if address.startswith("tls://") and security is None:
            raise UserError(f"the scheduler at {address} uses TLS: give the cluster's certificate with "
                            f"--tls-ca-file, --tls-cert and --tls-key")
        protocol = address.split("://")[0] if "://" in address else resolve_protocol(cfg, gpus)
        if security is not None and protocol == "tcp":
            protocol = "tls"
        ensure_ucxx(protocol, gpus)
        try:
            client = Client(address=cfg.scheduler_address, scheduler_file=cfg.scheduler_file, timeout=60,
                            security=security)
        except (OSError, TimeoutError, RuntimeError, TypeError) as e:  # unreachable, or a TLS mismatch
            raise UserError(f"cannot reach the Dask scheduler: {' '.join(str(e).split())}") from None
        try:
            yield client, protocol, client.dashboard_link
        finally:
            client.close()
        return

    protocol = resolve_protocol(cfg, gpus)
    if security is not None:  # config.validate refuses TLS with ucxx
        protocol = "tls"
    ensure_ucxx(protocol, gpus)
    scheduler = {"cls": Scheduler, "options": {
        "protocol": protocol, "host": "127.0.0.1", "dashboard_address": cfg.dashboard_address,
        "dashboard": True, "preload": ["pdbatch.dashboard"]}}  # pdbatch page + /metrics
    if security is not None:
        scheduler["options"]["security"] = security
    threads = worker_threads(cfg, cfg.prefill_workers + cfg.decode_workers)
    with preserved_environ(), worker_start_method(cfg, gpus):
        with engine_pre_spawn_environ(cfg):
            cluster = SpecCluster(workers=worker_specs(cfg, protocol, threads, gpus, security), scheduler=scheduler,
                                  silence_logs=logging.WARNING, name="pdbatch", security=security)
        try:
            client = Client(cluster)
            try:
                yield client, protocol, client.dashboard_link
            finally:
                client.close()
        finally:
            try:
                cluster.close(timeout=CLUSTER_CLOSE_TIMEOUT_S)
            except TimeoutError:  # the job's outcome stands; the workers are this process's children
                logging.getLogger("pdbatch").warning(
                    "the local cluster took over %.0f s to shut down; its worker processes end with this one",
                    CLUSTER_CLOSE_TIMEOUT_S)
