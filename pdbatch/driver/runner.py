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
from .roles import DEFAULT_UNIT_ROWS_CAP, auto_unit_rows


def run_job(cfg: JobConfig, echo=None) -> dict:
    from .cluster import connect, scheduler_identity, start_worker_forkserver
    from .pipeline import Pipeline

    echo = echo or (lambda msg: click.echo(msg, err=True))
    if not cfg.input or not cfg.output:
        raise UserError("an input and an output directory are required")
    check_model_dir(cfg.model)  # fail in one line now, not in every worker later
    plan = _plan(cfg, cfg.unit_rows or DEFAULT_UNIT_ROWS_CAP)  # the input is checked before any worker starts
    start_worker_forkserver(cfg)  # its imports overlap the model check below
    engine_class(cfg.engine).check_options(cfg.engine_options())  # a model or option it cannot run
    out = OutputDir(os.path.abspath(cfg.output))
    source = _unit_rows_from_job(cfg, out, plan)
    if cfg.unit_rows is not None:
        plan, done = _prepare(cfg, out)
        if plan.total_rows == 0:  # valid input with nothing to generate: no cluster to start
            echo("pdbatch: input has no rows; nothing to do")
            return _empty_output(cfg, plan, out)
    with connect(cfg) as (client, protocol, dashboard):
        if cfg.unit_rows is None:  # an existing cluster's fresh job: sized to the workers it has now
            workers = len(scheduler_identity(client)["workers"])
            cfg.unit_rows = auto_unit_rows(plan.total_rows, workers)
            plan, done = _prepare(cfg, out)
        echo(f"pdbatch: {plan.total_rows} rows in {len(plan.units)} units of {cfg.unit_rows} rows ({source}; "
             f"{len(done)} already done), mode {cfg.mode}, dashboard {page_url(dashboard) or 'off'}")
        progress = JobProgress(cfg.progress, echo, client)
        pipeline = Pipeline(cfg, client, plan, out, done, protocol=protocol, on_progress=progress,
                            unit_rows_source=source)
        pipeline.register_engines()
        try:
            report = pipeline.run()
        finally:
            progress.close()
    for line in summary_lines(report):
        echo(line)
    echo(f"output         {out.path}")
    return report


def _plan(cfg: JobConfig, unit_rows: int):
    return plan_input(cfg.input, prompt_column=cfg.prompt_column, id_column=cfg.id_column,
                      keep_columns=cfg.keep_columns, unit_rows=unit_rows)


def _unit_rows_from_job(cfg: JobConfig, out: OutputDir, plan) -> str:
    """Fix cfg.unit_rows when it was not given: a resumed job keeps the size it started with
    (its `_pdbatch/job.json`); a new job on the embedded cluster gets auto_unit_rows of its
    workers; on an existing cluster it stays None until the workers are counted. Returns where
    the size came from: option, resumed or auto."""
    if cfg.unit_rows is not None:
        return "option"
    stored = None if cfg.overwrite else out.stored_job()
    rows = stored.get("unit_rows") if stored else None
    if isinstance(rows, int) and not isinstance(rows, bool) and rows >= 1:
        cfg.unit_rows = rows
        return "resumed"
    if not cfg.existing_cluster or plan.total_rows == 0:
        cfg.unit_rows = auto_unit_rows(plan.total_rows, cfg.prefill_workers + cfg.decode_workers)
    return "auto"


def _prepare(cfg: JobConfig, out: OutputDir):
    """The plan in units of cfg.unit_rows (metadata only: cheap to redo), and the units already
    done (resume)."""
    plan = _plan(cfg, cfg.unit_rows)
    job = {"input": plan.fingerprint(), **cfg.result_options()}
    return plan, out.prepare(job, cfg.overwrite)


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
