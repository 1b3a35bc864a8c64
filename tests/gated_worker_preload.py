"""Test-only Dask worker preload (`dask worker --preload tests/gated_worker_preload.py`): pays the
engine's imports, says so in $PDBATCH_TEST_GATE.ready, then waits for the file $PDBATCH_TEST_GATE.
Dask runs preloads before the worker registers with the scheduler, so a worker started long
before a job still joins it mid-job, when the test opens the gate, without the test having to
size the job to outlast a process start and torch's import (~10-20 s of CPU here)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path


async def dask_setup(worker) -> None:
    import pdbatch.engines.builtin  # noqa: F401  (its model module, torch, transformers: the slow part)

    gate = Path(os.environ["PDBATCH_TEST_GATE"])
    Path(f"{gate}.ready").touch()
    while not gate.exists():
        await asyncio.sleep(0.05)
