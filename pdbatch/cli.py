"""`pdbatch` command line. Exit codes: 0 success, 1 failed job, 2 user error (one line, no
traceback), 130 interrupted (the output directory stays resumable)."""

from __future__ import annotations

import sys

import click

from .bench.cli import bench, plan
from .config import build_config
from .errors import UserError
from .options import job_options
from .slurm.submit import submit


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="pdbatch")
def cli():
    """Offline batch LLM inference with prefill/decode disaggregation on Dask."""


@cli.command()
@click.argument("input", type=str)
@click.option("-o", "--output", type=str, required=True, help="Output directory (Parquet shards + _pdbatch/).")
@click.option("--overwrite", is_flag=True, default=None, help="Replace OUTPUT if it holds other data or another run.")
@job_options
def run(input, output, config_file, **options):
    """Generate a completion for every row of INPUT (a Parquet file, directory or glob).

    Rerunning the same command resumes: finished units are skipped.
    """
    from .driver.runner import run_job

    cfg = build_config({"input": input, "output": output, **_cli_values(options)}, config_file)
    report = run_job(cfg)
    return 0 if report["rows"] == report["rows_expected"] else 1


def _cli_values(options: dict) -> dict:
    out = {}
    for k, v in options.items():
        if isinstance(v, tuple):
            v = list(v) if v else None
        out[k] = v
    return out


cli.add_command(submit)  # pdbatch/slurm/submit.py
cli.add_command(bench)  # pdbatch/bench/cli.py
cli.add_command(plan)


def main(argv=None) -> None:
    from .driver.pipeline import JobFailed

    try:
        rv = cli.main(args=argv, prog_name="pdbatch", standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("pdbatch: interrupted", err=True)
        sys.exit(130)
    except click.ClickException as e:
        click.echo(f"pdbatch: error: {' '.join(e.format_message().split())}", err=True)
        sys.exit(2)
    except UserError as e:
        click.echo(f"pdbatch: error: {e}", err=True)
        sys.exit(2)
    except JobFailed as e:
        click.echo(f"pdbatch: job failed: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("pdbatch: interrupted; rerun the same command to resume", err=True)
        sys.exit(130)
    sys.exit(rv if isinstance(rv, int) else 0)


if __name__ == "__main__":
    main()
