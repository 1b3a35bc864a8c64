"""`pdbatch run` end to end: check everything the user gave before any worker starts, get a
cluster, run the pipeline, print the summary."""

from __future__ import annotations

import os
import sys
import time

import click

from .config import JobConfig
from .dataset import plan_input
from .errors import UserError
from .model import check_model_dir
from .output import OutputDir
from .report import summary_lines


def run_job(cfg: JobConfig, echo=None) -> dict:
    from .cluster import connect
    from .pipeline import Pipeline

    echo = echo or (lambda msg: click.echo(msg, err=True))
    if not cfg.input or not cfg.output:
        raise UserError("an input and an output directory are required")
    check_model_dir(cfg.model)  # fail in one line now, not in every worker later
    plan = plan_input(cfg.input, prompt_column=cfg.prompt_column, id_column=cfg.id_column,
                      keep_columns=cfg.keep_columns, unit_rows=cfg.unit_rows)
    out = OutputDir(os.path.abspath(cfg.output))
    job = {"input": plan.fingerprint(), **cfg.result_options()}
    done = out.prepare(job, cfg.overwrite)
    if plan.total_rows == 0:
        echo("pdbatch: input has no rows; nothing to do")
    with connect(cfg) as (client, protocol, dashboard):
        echo(f"pdbatch: {plan.total_rows} rows in {len(plan.units)} units "
             f"({len(done)} already done), mode {cfg.mode}, dashboard {dashboard}")
        pipeline = Pipeline(cfg, client, plan, out, done, protocol=protocol,
                            on_progress=Progress(cfg.progress, plan.total_rows, echo))
        pipeline.register_engines()
        report = pipeline.run()
    for line in summary_lines(report):
        echo(line)
    echo(f"output         {out.path}")
    return report


class Progress:
    """Periodic progress lines (a live bar on a terminal is the monitoring issue's job)."""

    def __init__(self, kind: str, total: int, echo, every_s: float = 10.0):
        self.kind = "log" if kind == "auto" and not sys.stderr.isatty() else kind
        self.total, self.echo, self.every_s = total, echo, every_s
        self.last = time.time()

    def __call__(self, pipeline) -> None:
        if self.kind == "none" or time.time() - self.last < self.every_s:
            return
        self.last = time.time()
        t = pipeline.totals
        elapsed = time.time() - pipeline.started
        rate = pipeline.this_run.output_tokens / elapsed if elapsed > 0 else 0
        self.echo(f"pdbatch: {t.rows}/{self.total} rows, {rate:.0f} output tokens/s, "
                  f"{len(pipeline.inflight)} units in flight")
