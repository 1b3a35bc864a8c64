"""Slurm: `pdbatch submit` renders slurm/pdbatch.sbatch for a job and hands it to `sbatch`.

The batch script starts a Dask scheduler on the first node, one `srun` step per (node, role)
running that node's prefill or decode workers (`dask worker`, or `dask cuda worker` with one
worker per GPU), waits until every worker has registered (pdbatch/slurm/job.py), runs
the driver (`pdbatch run ... --scheduler-file`) and stops the steps when it exits; the job's exit
code is the driver's. Everything lands in OUT/_pdbatch/: the script (`job.sbatch`, resubmit it
with `sbatch` to resume), the log (`slurm-JOBID.out`) and the scheduler file.

Layout: workers fill the nodes slot by slot, prefill first, then decode. A slot is one GPU on
GPU nodes (`[slurm] gpus_per_node`), or `cpus_per_worker` cores on CPU nodes; so 2 nodes of 4
GPUs with 4 prefill + 4 decode workers give one node of prefill GPUs and one of decode GPUs.
"""

from __future__ import annotations

import glob
import math
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import click

from ..config import JobConfig, build_config
from ..driver.cluster import LOW_LEVEL_LOG_LENGTH
from ..driver.security import CERT_FILES, write_job_certificates
from ..errors import UserError
from ..io.output import META_DIR
from ..options import job_params

TEMPLATE = Path(__file__).resolve().parents[2] / "slurm" / "pdbatch.sbatch"  # the repository's slurm/
SCRIPT_NAME = "job.sbatch"
LOG_NAME = "slurm-%j.out"
# `run` options the batch script sets itself, or that mean nothing to a driver on a cluster
DRIVER_SKIPS = {"input", "output", "config_file", "scheduler_address", "scheduler_file",
                "dashboard_address", "interface", "protocol", "overwrite"}


# --- layout -----------------------------------------------------------------------------------
@dataclass
class WorkerStep:
    """One `srun` step: `count` workers of one role on node number `node`."""
    role: str
    node: int
    count: int
    first_slot: int  # first GPU (of the node's) this step uses


@dataclass
class Layout:
    nodes: int
    slots_per_node: int
    steps: list[WorkerStep]


def plan_layout(cfg: JobConfig) -> Layout:
    s = cfg.slurm
    roles = ["prefill"] * cfg.prefill_workers + ["decode"] * cfg.decode_workers
    if s.gpus_per_node:
        slots = s.gpus_per_node
    else:
        slots = math.ceil(len(roles) / (s.nodes or 1))
    needed = math.ceil(len(roles) / slots)
    what = (f"{cfg.prefill_workers} prefill + {cfg.decode_workers} decode workers"
            + (f" (one GPU each, {slots} per node)" if s.gpus_per_node else ""))
    if s.nodes and s.nodes < needed:
        raise UserError(f"{what} need {needed} nodes, but [slurm] nodes = {s.nodes}")
    if s.nodes and s.nodes > needed:
        raise UserError(f"{what} fill only {needed} of the {s.nodes} nodes asked for; "
                        f"lower nodes or raise the worker counts")
    steps: list[WorkerStep] = []
    for i, role in enumerate(roles):
        node, slot = divmod(i, slots)
        if steps and steps[-1].role == role and steps[-1].node == node:
            steps[-1].count += 1
        else:
            steps.append(WorkerStep(role, node, 1, slot))
    return Layout(nodes=needed, slots_per_node=slots, steps=steps)


def resolve_protocol(cfg: JobConfig) -> str:
    if cfg.protocol != "auto":
        return cfg.protocol
    return "ucxx" if cfg.slurm.gpus_per_node and cfg.tls == "off" else "tcp"  # TLS runs over tcp


def job_tls_files(cfg: JobConfig) -> tuple[str, str, str] | None:
    """(CA, certificate, key) the job's scheduler, workers and driver use; None without TLS.
    `tls = "auto"`: files made for this job in OUT/_pdbatch/tls/ when it is submitted."""
    if cfg.tls == "off":
        return None
    if cfg.tls == "auto":
        return tuple(os.path.join(os.path.abspath(cfg.output), META_DIR, "tls", n) for n in CERT_FILES)
    return tuple(os.path.abspath(p) for p in (cfg.tls_ca_file, cfg.tls_cert, cfg.tls_key))


# --- rendering --------------------------------------------------------------------------------
def render_script(cfg: JobConfig, workdir: str | None = None) -> str:
    """The batch script for this job (cfg.output must be set)."""
    s = cfg.slurm
    layout = plan_layout(cfg)
    protocol = resolve_protocol(cfg)
    out = os.path.abspath(cfg.output)
    python = s.python or sys.executable
    tls = job_tls_files(cfg)
    if tls and protocol == "ucxx":
        raise UserError("TLS cannot protect UCX traffic (see docs/security.md); use --protocol tcp with TLS")
    tls_options = []
    if tls:
        for flag, path in zip(("--tls-ca-file", "--tls-cert", "--tls-key"), tls):
            tls_options += [flag, shlex.quote(path)]
        # the driver gets the files, whatever `tls` said (auto means "made at submit time")
        cfg = replace(cfg, tls="files", tls_ca_file=tls[0], tls_cert=tls[1], tls_key=tls[2])

    sbatch = []
    if s.gpus_per_node:
        sbatch.append(f"--gres=gpu:{s.gpus_per_node}")
    for opt, value in (("partition", s.partition), ("account", s.account), ("time", s.time)):
        if value:
            sbatch.append(f"--{opt}={_sbatch_value(value, opt)}")
    for line in s.sbatch_lines:
        line = _one_line(line, "sbatch_lines").strip()
        sbatch.append(line[len("#SBATCH"):].strip() if line.startswith("#SBATCH") else line)

    env = []
    if protocol == "ucxx" and not s.gpus_per_node:
        from ..driver.cluster import UCX_CPU_ENV

        env.append("# UCX on CPU hosts runs over TCP; the memtype-cache warning is noise")
        env += [f"export {k}={shlex.quote(v)}" for k, v in UCX_CPU_ENV.items()]
    if protocol == "ucxx" and s.gpus_per_node:
        env.append("# UCXX picks its transports itself when scheduler and client hold a CUDA context")
        env.append("export DASK_DISTRIBUTED_UCXX__CREATE_CUDA_CONTEXT=True")

    worker_opts = [shlex.quote(a) for opt in s.worker_options for a in shlex.split(_one_line(opt, "worker_options"))]
    steps = []
    for st in layout.steps:
        gpu = f" {st.first_slot}" if s.gpus_per_node else ""
        steps.append(f"start_workers {st.role} {st.node} {st.count}{gpu}")

    values = {
        "job_name": _sbatch_value(s.job_name, "job_name"),
        "nodes": str(layout.nodes),
        "cpus_per_node": str(layout.slots_per_node * s.cpus_per_worker),
        "log": _sbatch_value(os.path.join(out, META_DIR, LOG_NAME), "output"),
        "workdir": _sbatch_value(workdir or os.getcwd(), "working directory"),
        "sbatch_options": "\n".join(f"#SBATCH {o}" for o in sbatch),
        "setup": "\n".join(_one_line(line, "setup") for line in s.setup),
        "python": shlex.quote(python),
        "output": shlex.quote(out),
        "protocol": protocol,
        "comm": "tls" if tls else protocol,
        "tls_options": " ".join(tls_options),
        "interface": shlex.quote(cfg.interface or ""),
        "gpus_per_node": str(s.gpus_per_node),
        "cpus_per_worker": str(s.cpus_per_worker),
        "workers": str(cfg.prefill_workers + cfg.decode_workers),
        "startup_timeout": str(s.startup_timeout),
        "dashboard_port": str(s.dashboard_port),
        "environment": "\n".join(env),
        "worker_options": " ".join(worker_opts),
        "worker_steps": "\n".join(steps),
        "driver": driver_command(cfg),
        "low_level_log_length": str(LOW_LEVEL_LOG_LENGTH),
    }
    return fill_template(TEMPLATE.read_text(), values)


def fill_template(text: str, values: dict[str, str]) -> str:
    """Replace every @{name}; a name without a value (or a value without a use) is a bug."""
    used = set()

    def sub(m):
        used.add(m.group(1))
        return values[m.group(1)]

    text = re.sub(r"@\{(\w+)\}", sub, text)
    unused = set(values) - used
    assert not unused, f"template fields never used: {unused}"
    return text


def driver_command(cfg: JobConfig) -> str:
    """`pdbatch run` with every option of this job that differs from the defaults."""
    defaults = asdict(JobConfig())
    values = asdict(cfg)
    chunks = [shlex.quote(cfg.input), '-o "$OUT"', '--scheduler-file "$SCHEDULER_FILE"',
              '--protocol "$PROTOCOL"', f"--model {shlex.quote(cfg.model)}"]
    for param in job_params():  # the options of `run` that a job file may set
        name = param.name
        if name in DRIVER_SKIPS or name == "model" or name not in values or values[name] == defaults[name]:
            continue
        value, flag = values[name], param.opts[0]
        if isinstance(value, bool):
            chunks.append(flag if value else param.secondary_opts[0])
        elif isinstance(value, list):
            chunks += [f"{flag} {shlex.quote(str(v))}" for v in value]
        else:
            chunks.append(f"{flag} {shlex.quote(str(value))}")
    lines = ['"$PYTHON" -m pdbatch.cli run']
    for chunk in chunks:
        if len(lines[-1]) + len(chunk) > 95:
            lines[-1] += " \\"
            lines.append("    " + chunk)
        else:
            lines[-1] += " " + chunk
    return "\n".join(lines)


def _one_line(text: str, what: str) -> str:
    if "\n" in text or "\r" in text:
        raise UserError(f"[slurm] {what} must not contain line breaks: {text!r}")
    return text


def _sbatch_value(value: str, what: str) -> str:
    """A value on an #SBATCH line (sbatch parses these itself: double quotes, no shell)."""
    value = _one_line(str(value), what)
    if '"' in value:
        raise UserError(f"{what} must not contain '\"': {value!r}")
    return f'"{value}"' if re.search(r"\s", value) else value


# --- submit -----------------------------------------------------------------------------------
def script_path(cfg: JobConfig) -> str:
    return os.path.join(os.path.abspath(cfg.output), META_DIR, SCRIPT_NAME)


def prepare_output(cfg: JobConfig) -> None:
    """OUT must be new, or one of pdbatch's (then the job resumes it); --overwrite empties it.

    The same rule as `pdbatch run` (OutputDir.prepare), checked before anything is submitted.
    """
    out = os.path.abspath(cfg.output)
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"output path exists and is not a directory: {out}")
    if cfg.overwrite and os.path.isdir(out):
        shutil.rmtree(out)
    if os.path.isdir(out):
        foreign = [e for e in os.listdir(out) if e != META_DIR]
        if foreign and not os.path.isfile(os.path.join(out, META_DIR, "job.json")):
            raise UserError(f"output directory {out} is not empty and holds no pdbatch run; "
                            f"use --overwrite to replace it")
    os.makedirs(os.path.join(out, META_DIR), exist_ok=True)


def submit_job(cfg: JobConfig, dry_run: bool = False, echo=None) -> str | None:
    """Render the script; unless dry_run, write it to OUT/_pdbatch/ and sbatch it. Job id."""
    echo = echo or (lambda msg: click.echo(msg, err=True))
    if not cfg.input or not cfg.output:
        raise UserError("pdbatch submit needs an input and an output directory: set `input` and "
                        "`output` in the job file, or give --input and --output")
    if cfg.existing_cluster:
        raise UserError("pdbatch submit starts its own Dask scheduler: drop --scheduler-address/--scheduler-file")
    script = render_script(cfg)
    if dry_run:
        click.echo(script, nl=False)
        return None
    if shutil.which("sbatch") is None:
        raise UserError("sbatch not found on PATH: run pdbatch submit where Slurm's commands are "
                        "installed (a login node), or use --dry-run to see the script")
    for what, path in (("model directory", cfg.model), ("input", cfg.input)):
        if not any(os.path.exists(p) for p in _glob(path)):
            echo(f"pdbatch: warning: {what} {path} not found here; the job fails unless the nodes see it")
    prepare_output(cfg)
    if cfg.tls == "auto":
        write_job_certificates(os.path.dirname(job_tls_files(cfg)[0]))
    path = script_path(cfg)
    with open(path, "w") as f:
        f.write(script)
    os.chmod(path, 0o755)
    r = subprocess.run(["sbatch", "--parsable", path], capture_output=True, text=True)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout).split()) or f"exit code {r.returncode}"
        raise UserError(f"sbatch refused the job: {msg} (script: {path})")
    job_id = r.stdout.strip().split(";")[0]
    log = os.path.join(os.path.dirname(path), LOG_NAME.replace("%j", job_id))
    port = cfg.slurm.dashboard_port
    login = socket.gethostname()
    echo(f"pdbatch: submitted Slurm job {job_id}")
    echo(f"  script     {path}  (resubmit it with sbatch to resume)")
    echo(f"  log        {log}")
    echo(f"  status     squeue -j {job_id}   cancel: scancel {job_id}")
    echo(f"  dashboard  once it runs: ssh -N -L {port}:$(squeue -h -j {job_id} -o %B):{port} {login}, "
         f"then http://localhost:{port}/status (the log prints the exact line)")
    click.echo(job_id)
    return job_id


def _glob(path: str) -> list[str]:
    return glob.glob(path) or [path]


@click.command()
@click.argument("job_file", required=False, type=str)
@click.option("-i", "--input", type=str, help="Parquet file, directory or glob (default: the job file's `input`).")
@click.option("-o", "--output", type=str, help="Output directory on a file system the nodes share (default: the job file's `output`).")
@click.option("--overwrite", is_flag=True, default=None, help="Empty OUTPUT before submitting (else the job resumes it).")
@click.option("--dry-run", is_flag=True, help="Print the batch script; submit nothing, write nothing.")
@click.option("--nodes", type=int, help="Nodes (default: as many as the workers need).")
@click.option("--gpus-per-node", type=int, help="GPUs per node; each GPU runs one worker (`dask cuda worker`). 0: CPU nodes.")
@click.option("--cpus-per-worker", type=int, help="CPU cores per worker (default 1).")
@click.option("-p", "--partition", type=str, help="Slurm partition.")
@click.option("-A", "--account", type=str, help="Slurm account.")
@click.option("-t", "--time", type=str, help="Time limit, e.g. 02:00:00.")
@click.option("-J", "--job-name", type=str, help="Slurm job name (default pdbatch).")
@click.option("--sbatch-line", "sbatch_lines", type=str, multiple=True, help="Extra sbatch option, e.g. --qos=high (repeatable).")
@click.option("--setup", type=str, multiple=True, help="Shell line the job runs first, e.g. 'module load cuda' (repeatable).")
@click.option("--python", type=str, help="Python on the nodes (default: the one running this command).")
def submit(job_file, input, output, overwrite, dry_run, config_file, **options):
    """Run a job on Slurm: render its batch script into OUTPUT/_pdbatch/ and sbatch it.

    JOB_FILE is a TOML job file (the same keys as `pdbatch run`'s options, plus input, output
    and a [slurm] table); command-line options win. Prints the Slurm job id.
    """
    if job_file and config_file:
        raise UserError("give the job file once: as JOB_FILE or as --config")
    slurm_keys = ("nodes", "gpus_per_node", "cpus_per_worker", "partition", "account", "time", "job_name",
                  "sbatch_lines", "setup", "python")
    slurm = {k: v for k in slurm_keys if (v := _cli_value(options.pop(k))) is not None}
    values = {k: _cli_value(v) for k, v in options.items()}
    cfg = build_config({"input": input, "output": output, "overwrite": overwrite, **values,
                        "slurm": slurm}, job_file or config_file)
    submit_job(cfg, dry_run=dry_run)
    return 0


def _cli_value(v):
    if isinstance(v, tuple):
        return list(v) if v else None
    return v


# The shared `run` options go after submit's own (pdbatch/options.py).
def _add_job_options(command: click.Command) -> None:
    own_cluster = {"scheduler_address", "scheduler_file", "dashboard_address"}  # the job starts its own
    params = [p for p in job_params() if p.name not in own_cluster]
    position = 4  # after JOB_FILE, --input, --output, --overwrite
    command.params[position:position] = params


_add_job_options(submit)
