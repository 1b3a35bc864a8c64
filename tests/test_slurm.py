"""`pdbatch submit` on a real one-node Slurm (tests/slurm_fixture.py), and the rendered batch
script of a GPU job run offline against stand-in `srun`/`scontrol`/Python commands.

The three real jobs (good, bad model, TLS) are submitted together at the start; the node's 2 CPUs
fit one job at a time, so Slurm runs them back to back while the offline tests go on.
"""

from __future__ import annotations

import os
import re
import shlex
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from pipeline_helpers import DEFAULT_MODEL, PDBATCH, REPO, SAMPLE, assert_sample_matches_hf, read_report, read_rows

from pdbatch.config import build_config
from pdbatch.engines.builtin.model import load_model
from pdbatch.errors import UserError
from pdbatch.slurm.submit import plan_layout, prepare_output, render_script

NEW = 8  # tokens per row: enough to check decode, quick on 2 cores
UNIT_ROWS = 32  # the sample's 64 rows in 2 units
JOB_TIMEOUT = 420  # the machine is shared: generous


def submit(cluster, *args) -> tuple[str, subprocess.CompletedProcess]:
    r = subprocess.run([*PDBATCH, "submit", *map(str, args)], env=cluster.env, cwd=REPO,
                       capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip(), r


def slurm_log(out: Path, job_id: str) -> str:
    return (out / "_pdbatch" / f"slurm-{job_id}.out").read_text(errors="replace")


def job_processes(cluster, job_id: str) -> list[int]:
    """Live processes of this Slurm job: their environment has our SLURM_CONF and the job id."""
    marks = {f"SLURM_CONF={cluster.conf}".encode(), f"SLURM_JOB_ID={job_id}".encode()}
    pids = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit() or int(p.name) == os.getpid():
            continue
        try:
            if marks <= set((p / "environ").read_bytes().split(b"\0")):
                pids.append(int(p.name))
        except OSError:
            continue
    return pids


def assert_nothing_left(cluster, job_id: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while (left := job_processes(cluster, job_id)) and time.monotonic() < deadline:
        time.sleep(0.5)
    cmdlines = []
    for pid in left:
        try:
            cmdlines.append(Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode())
        except OSError:
            pass
    assert not cmdlines, f"job {job_id} left processes behind: {cmdlines}"


def wait_done(cluster, job_id: str, out: Path):
    result = cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    print(f"Slurm job {job_id} ({out.name}): {result.state}, run time {result.info.get('RunTime')}")
    return result, slurm_log(out, job_id)


@pytest.fixture(scope="module")
def jobs(slurm_cluster, tmp_path_factory):
    root = tmp_path_factory.mktemp("slurm-jobs")
    good, bad, tls = root / "good", root / "bad", root / "tls"
    started = time.monotonic()
    good_id, good_submit = submit(slurm_cluster, "jobs/cpu-smoke.toml", "-o", good,
                                  "--max-new-tokens", NEW, "--unit-rows", UNIT_ROWS)
    bad_id, bad_submit = submit(slurm_cluster, "jobs/cpu-smoke.toml", "-o", bad,
                                "--model", root / "no-such-model")
    tls_id, tls_submit = submit(slurm_cluster, "jobs/cpu-smoke.toml", "-o", tls, "--tls", "auto",
                                "--max-new-tokens", NEW)
    return {"good": (good_id, good, good_submit), "bad": (bad_id, bad, bad_submit),
            "tls": (tls_id, tls, tls_submit), "started": started}


@pytest.fixture(scope="module")
def tiny():
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


def test_cpu_job_matches_hf_generate(jobs, slurm_cluster, tiny):
    job_id, out, sub = jobs["good"]
    assert job_id.isdigit(), sub.stdout
    assert f"slurm-{job_id}.out" in sub.stderr and "ssh -N -L 8787:" in sub.stderr
    result, log = wait_done(slurm_cluster, job_id, out)
    print(f"submit to end: {time.monotonic() - jobs['started']:.0f}s")
    assert (result.state, result.exit_code) == ("COMPLETED", 0), log[-3000:]

    rows = assert_sample_matches_hf(out, tiny, NEW)
    assert (out / "_SUCCESS").exists()
    report = read_report(out)
    assert report["rows"] == len(rows) and report["workers"] == {"prefill": 1, "decode": 1}

    # the log tells the story in order: cluster up, dashboard hint, driver, clean stop
    marks = ["cluster up: 2 workers (1 decode, 1 prefill)", "ssh -N -L", "starting the driver",
             "driver exited with code 0", "stopping the workers and the scheduler", "all steps stopped"]
    positions = [log.find(m) for m in marks]
    assert -1 not in positions and positions == sorted(positions), log[-3000:]
    assert "KeyError" not in log

    script = out / "_pdbatch" / "job.sbatch"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    assert_nothing_left(slurm_cluster, job_id)


def test_resubmitted_script_resumes(jobs, slurm_cluster, tiny):
    """Resubmitting the script redoes only what is missing: here one deleted shard."""
    job_id, out, _ = jobs["good"]
    slurm_cluster.wait_job(job_id, timeout=JOB_TIMEOUT)
    before = {r["id"]: r["output_token_ids"] for r in read_rows(out)}
    shards = sorted(out.glob("part-*.parquet"))
    assert len(shards) == 2
    shards[1].unlink()
    kept_mtime = shards[0].stat().st_mtime_ns
    again = slurm_cluster.sbatch(str(out / "_pdbatch" / "job.sbatch"))
    result, log = wait_done(slurm_cluster, again, out)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), log[-3000:]
    assert re.search(r"64 rows in 2 units of \d+ rows \(\w+; 1 already done\)", log), log[-3000:]
    assert shards[0].stat().st_mtime_ns == kept_mtime and shards[1].exists()
    assert {r["id"]: r["output_token_ids"] for r in read_rows(out)} == before
    assert (out / "_SUCCESS").exists()
    assert_nothing_left(slurm_cluster, again)


def test_bad_model_fails_with_a_log_line_naming_it(jobs, slurm_cluster):
    job_id, out, sub = jobs["bad"]
    assert "warning: model directory" in sub.stderr  # submit warns but submits: nodes may differ
    result, log = wait_done(slurm_cluster, job_id, out)
    assert result.state == "FAILED" and result.exit_code == 2, (result.info, log[-3000:])
    assert f"pdbatch: error: model directory not found: {out.parent / 'no-such-model'}" in log
    assert "driver exited with code 2" in log and "all steps stopped" in log
    assert "Traceback" not in log.split("starting the driver")[1].split("driver exited")[0]
    assert not list(out.glob("part-*")) and not (out / "_SUCCESS").exists()
    assert_nothing_left(slurm_cluster, job_id)


def test_tls_job_runs_every_connection_over_tls(jobs, slurm_cluster, tiny):
    """`tls = "auto"` on Slurm: a per-job CA and certificate, owner-only, given to the scheduler,
    the workers, the driver and the helper that waits for them; the scheduler listens on tls://."""
    job_id, out, _ = jobs["tls"]
    tls_dir = out / "_pdbatch" / "tls"
    assert stat.S_IMODE(tls_dir.stat().st_mode) == 0o700
    for name in ("ca.pem", "cert.pem", "key.pem"):
        assert stat.S_IMODE((tls_dir / name).stat().st_mode) == 0o600, name
    result, log = wait_done(slurm_cluster, job_id, out)
    assert (result.state, result.exit_code) == ("COMPLETED", 0), log[-3000:]
    assert_sample_matches_hf(out, tiny, NEW)
    assert re.search(r"cluster up: 2 workers \(1 decode, 1 prefill\), scheduler tls://", log), log[-3000:]
    script = (out / "_pdbatch" / "job.sbatch").read_text()
    assert f"TLS_OPTS=(--tls-ca-file {tls_dir}/ca.pem --tls-cert {tls_dir}/cert.pem --tls-key {tls_dir}/key.pem)" in script
    assert f"--tls files --tls-ca-file {tls_dir}/ca.pem" in " ".join(script.replace("\\\n", " ").split())
    assert_nothing_left(slurm_cluster, job_id)


def test_tls_options_in_the_rendered_script(tmp_path):
    def cfg(**kw):
        return build_config({"input": SAMPLE, "output": str(tmp_path / "o"), **kw})

    files = [tmp_path / n for n in ("ca.pem", "cert.pem", "key.pem")]
    for f in files:
        f.write_text("PEM")
    script = render_script(cfg(tls_ca_file=str(files[0]), tls_cert=str(files[1]), tls_key=str(files[2])))
    assert "COMM=tls" in script and "PROTOCOL=tcp" in script
    assert f"TLS_OPTS=(--tls-ca-file {files[0]} --tls-cert {files[1]} --tls-key {files[2]})" in script
    # GPU nodes default to UCX, which TLS cannot protect: with TLS the job runs over tcp
    gpu = render_script(cfg(tls="auto", slurm={"gpus_per_node": 2}))
    assert "COMM=tls" in gpu and "PROTOCOL=tcp" in gpu and "UCXX" not in gpu
    with pytest.raises(UserError, match="TLS cannot protect UCX traffic"):
        render_script(cfg(tls="auto", protocol="ucxx", slurm={"gpus_per_node": 2}))
    plain = render_script(cfg())
    assert "COMM=tcp" in plain and "TLS_OPTS=()" in plain


# --- the GPU script, run offline with stand-ins --------------------------------------------------
FAKE_SRUN = """#!/bin/bash
# stand-in srun: record the command line, drop srun's own options, run the rest on "this node"
printf '%s\\n' "$(printf '%q ' "$@")" >> "$FAKE_LOG/srun"
while [[ $1 == -* ]]; do shift; done
export CUDA_VISIBLE_DEVICES=$FAKE_STEP_GPUS
exec "$@"
"""
FAKE_PYTHON = """#!/bin/bash
# stand-in Python: record what it was asked to run (and which GPUs it saw), start nothing
echo "CUDA=${CUDA_VISIBLE_DEVICES-unset} $*" >> "$FAKE_LOG/python"
case "$*" in *"pdbatch.cli run"*) exit "$FAKE_DRIVER_RC";; esac
"""
FAKE_TOOLS = {
    "srun": FAKE_SRUN,
    "python": FAKE_PYTHON,
    "scontrol": '#!/bin/bash\nprintf "%s\\n" $FAKE_NODES\n',  # `scontrol show hostnames`
    "squeue": "#!/bin/bash\n",
    "scancel": '#!/bin/bash\necho "$*" >> "$FAKE_LOG/scancel"\n',
}


def run_offline(tmp_path: Path, script: str, nodes: str, step_gpus: str, driver_rc: int):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    for name, text in FAKE_TOOLS.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    logs = tmp_path / "logs"
    logs.mkdir(exist_ok=True)
    path = tmp_path / "job.sbatch"
    path.write_text(script)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "FAKE_LOG": str(logs),
           "FAKE_NODES": nodes, "FAKE_STEP_GPUS": step_gpus, "FAKE_DRIVER_RC": str(driver_rc),
           "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "gpu[01-02]"}
    r = subprocess.run(["bash", str(path)], env=env, capture_output=True, text=True, timeout=60)
    srun = [shlex.split(line) for line in (logs / "srun").read_text().splitlines()]
    python = (logs / "python").read_text().splitlines()
    return r, srun, python


def dry_run(*args) -> str:
    r = subprocess.run([*PDBATCH, "submit", *map(str, args), "--dry-run"], cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_gpu_script_two_nodes_prefill_and_decode(tmp_path):
    fake_python = tmp_path / "bin" / "python"
    out = tmp_path / "out"
    script = dry_run("jobs/gpu-2node.toml", "-o", out, "--python", fake_python)
    assert not out.exists()  # --dry-run writes nothing
    assert subprocess.run(["bash", "-n"], input=script, text=True).returncode == 0
    for line in ("#SBATCH --nodes=2", "#SBATCH --gres=gpu:4", "#SBATCH --cpus-per-task=32",
                 "#SBATCH --partition=gpu", "#SBATCH --account=my-project", "#SBATCH --time=04:00:00",
                 "#SBATCH --exclusive", "#SBATCH --mem=0", f"#SBATCH --output={out}/_pdbatch/slurm-%j.out",
                 "export DASK_DISTRIBUTED_UCXX__CREATE_CUDA_CONTEXT=True", "module load cuda/12.4"):
        assert line in script.splitlines(), line

    r, srun, python = run_offline(tmp_path, script, "gpu01 gpu02", "0,1,2,3", driver_rc=3)
    assert r.returncode == 3, r.stdout + r.stderr  # the driver's exit code is the job's
    by_name = {next(a for a in step if a.startswith("--job-name=")): step for step in srun}
    sched, prefill, decode = (by_name[f"--job-name={n}"] for n in ("scheduler", "prefill", "decode"))
    sched_opts = sched[sched.index("--scheduler-file"):]
    assert "--nodelist=gpu01" in sched and "dask" in sched and "scheduler" in sched
    assert sched_opts[:2] == ["--scheduler-file", f"{out}/_pdbatch/scheduler.json"]
    assert ["--protocol", "ucxx", "--interface", "ib0"] == sched[sched.index("--protocol"):][:4]
    for step, role, node in ((prefill, "prefill", "gpu01"), (decode, "decode", "gpu02")):
        assert step[:6] == ["--overlap", f"--job-name={role}", "--nodes=1", "--ntasks=1",
                            f"--nodelist={node}", "--cpus-per-task=32"]
        worker = step[step.index(str(fake_python)):]
        assert worker[:4] == [str(fake_python), "-m", "dask", "cuda"] and worker[4] == "worker"
        opts = " ".join(worker)
        for want in (f"--resources {role}=1", "--protocol ucxx --interface ib0", "--nthreads 1",
                     f"--name {role}-{node}", f"--scheduler-file {out}/_pdbatch/scheduler.json"):
            assert want in opts, (want, opts)
    # each step sees all 4 of its node's GPUs (a whole node per role: no slicing)
    workers = [p for p in python if "dask cuda worker" in p]
    assert len(workers) == 2 and all(p.startswith("CUDA=0,1,2,3 ") for p in workers)
    wait, driver, stop = [p for p in python if "-m pdbatch." in p]
    assert "pdbatch.slurm.job wait" in wait and "--workers 8" in wait
    for want in ("-m pdbatch.cli run prompts/*.parquet", f"-o {out}", "--protocol ucxx",
                 f"--scheduler-file {out}/_pdbatch/scheduler.json", "--model /models/Meta-Llama-3-8B-Instruct",
                 "--prefill-workers 4", "--decode-workers 4", "--dtype bfloat16", "--kv-budget 40GiB"):
        assert want in driver, (want, driver)
    assert "pdbatch.slurm.job stop" in stop  # after the driver: the steps are stopped


def test_gpu_node_shared_by_both_roles_splits_its_gpus(tmp_path):
    fake_python = tmp_path / "bin" / "python"
    script = dry_run("jobs/gpu-2node.toml", "-o", tmp_path / "out", "--python", fake_python,
                     "--nodes", 1, "--prefill-workers", 1, "--decode-workers", 3)
    assert "#SBATCH --nodes=1" in script and "start_workers prefill 0 1 0" in script
    # Slurm gave the steps GPUs 4-7 of the node: prefill takes the first, decode the other three
    r, srun, python = run_offline(tmp_path, script, "gpu01", "4,5,6,7", driver_rc=0)
    assert r.returncode == 0, r.stdout + r.stderr
    workers = {p.split("--resources ")[1].split()[0]: p.split()[0] for p in python if "cuda worker" in p}
    assert workers == {"prefill=1": "CUDA=4", "decode=1": "CUDA=5,6,7"}


def test_layout_and_option_errors(tmp_path):
    def cfg(**kw):
        return build_config({"input": SAMPLE, "output": str(tmp_path / "o"), **kw})

    layout = plan_layout(cfg(prefill_workers=1, decode_workers=3, slurm={"nodes": 2}))
    assert [(s.role, s.node, s.count) for s in layout.steps] == [("prefill", 0, 1), ("decode", 0, 1), ("decode", 1, 2)]
    assert layout.slots_per_node == 2
    with pytest.raises(UserError, match="need 3 nodes"):
        plan_layout(cfg(prefill_workers=4, decode_workers=8, slurm={"gpus_per_node": 4, "nodes": 2}))
    with pytest.raises(UserError, match="fill only 1 of the 3 nodes"):
        plan_layout(cfg(slurm={"nodes": 3, "gpus_per_node": 2}))
    with pytest.raises(UserError, match="unknown key 'gpus'"):
        cfg(slurm={"gpus": 2})
    with pytest.raises(UserError, match="cpus_per_worker must be an integer"):
        cfg(slurm={"cpus_per_worker": "four"})
    # UCX on CPU nodes: TCP transport in every process of the job
    script = render_script(cfg(protocol="ucxx"))
    assert "export UCX_TLS=tcp" in script and "export UCX_WARN_UNUSED_ENV_VARS=n" in script
    assert "PROTOCOL=ucxx" in script and "dask worker --nworkers" in script
    # an output directory holding something else is refused before anything is submitted
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and holds no pdbatch run"):
        prepare_output(build_config({"input": SAMPLE, "output": str(foreign)}))


def test_submit_without_sbatch_is_a_one_line_error(tmp_path):
    env = {**os.environ, "PATH": os.path.dirname(sys.executable)}  # no Slurm commands here
    r = subprocess.run([*PDBATCH, "submit", "jobs/cpu-smoke.toml", "-o", tmp_path / "o"], env=env,
                       cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        "pdbatch: error: sbatch not found on PATH: run pdbatch submit where Slurm's commands are "
        "installed (a login node), or use --dry-run to see the script"]
    assert not (tmp_path / "o").exists()
