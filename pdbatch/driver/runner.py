"""`pdbatch run` end to end: check everything the user gave before any worker starts, get a
cluster, run the pipeline, print the summary."""

from __future__ import annotations

import os

import click

from ..config import JobConfig
from ..engines import engine_class
from ..engines.model_dir import check_model_dir
from ..errors import UserError
from ..io.dataset import plan_input
from ..io.output import OutputDir
from ..monitoring.dashboard import page_url
from ..monitoring.progress import JobProgress
from ..monitoring.report import summary_lines


def run_job(cfg: JobConfig, echo=None) -> dict:
    from .cluster import connect
    from .pipeline import Pipeline

    echo = echo or (lambda msg: click.echo(msg, err=True))
    if not cfg.input or not cfg.output:
        raise UserError("an input and an output directory are required")
    check_model_dir(cfg.model)  # fail in one line now, not in every worker later
    engine_class(cfg.engine).check_options(cfg.engine_options())  # a model or option it cannot run
    plan = plan_input(cfg.input, prompt_column=cfg.prompt_column, id_column=cfg.id_column,
                      keep_columns=cfg.keep_columns, unit_rows=cfg.unit_rows)
    out = OutputDir(os.path.abspath(cfg.output))
    job = {"input": plan.fingerprint(), **cfg.result_options()}
    done = out.prepare(job, cfg.overwrite)
    if plan.total_rows == 0:  # valid input with nothing to generate: no cluster to start
        echo("pdbatch: input has no rows; nothing to do")
        return _empty_output(cfg, plan, out)
    with connect(cfg) as (client, protocol, dashboard):
        echo(f"pdbatch: {plan.total_rows} rows in {len(plan.units)} units "
             f"({len(done)} already done), mode {cfg.mode}, dashboard {page_url(dashboard) or 'off'}")
        progress = JobProgress(cfg.progress, echo, client)
        pipeline = Pipeline(cfg, client, plan, out, done, protocol=protocol, on_progress=progress)
        pipeline.register_engines()
        try:
            report = pipeline.run()
        finally:
            progress.close()
    for line in summary_lines(report):
        echo(line)
    echo(f"output         {out.path}")
    return report


def _empty_output(cfg: JobConfig, plan, out: OutputDir) -> dict:
    """A zero-row input gives a zero-row dataset (with the output schema, so readers see the
    columns), a report and _SUCCESS."""
    import pyarrow.parquet as pq

    from ..io.output import OUTPUT_SCHEMA, write_shard
    from ..monitoring.report import RunTotals, build_report

    table = OUTPUT_SCHEMA.empty_table()
    keep = pq.ParquetFile(plan.files[0]).schema_arrow.empty_table().select(plan.keep_columns)
    for name in keep.column_names:
        table = table.append_column(name, keep.column(name))
    write_shard(out.path, "empty", table)
    report = build_report(RunTotals(), this_run=RunTotals(), wall_s=0.0, mode=cfg.mode, workers={},
                          dashboard=None, total_rows=0, resumed_units=0, dask_transfer_bytes=0,
                          protocol="none")
    out.write_report(report)
    out.mark_success()
    return report
