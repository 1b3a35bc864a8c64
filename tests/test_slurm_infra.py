"""The one-node Slurm fixture really runs batch jobs and reports their outcome."""

import socket


def test_sbatch_job_completes(slurm_cluster, tmp_path):
    out = tmp_path / "result.txt"
    job_id = slurm_cluster.sbatch(
        "--job-name=infra-ok", f"--output={tmp_path / 'slurm-%j.out'}",
        "--wrap", f"hostname > {out}; echo payload-$SLURM_JOB_ID >> {out}")
    result = slurm_cluster.wait_job(job_id, timeout=60)
    assert (result.state, result.exit_code, result.signal) == ("COMPLETED", 0, 0), result.info
    host, payload = out.read_text().split()
    assert host == socket.gethostname().split(".")[0]
    assert payload == f"payload-{job_id}"


def test_sbatch_job_failure_is_visible(slurm_cluster, tmp_path):
    job_id = slurm_cluster.sbatch(
        "--job-name=infra-fail", f"--output={tmp_path / 'slurm-%j.out'}", "--wrap", "exit 3")
    result = slurm_cluster.wait_job(job_id, timeout=60)
    assert result.state == "FAILED", result.info
    assert result.exit_code == 3 and result.signal == 0
