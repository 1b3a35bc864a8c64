"""Alias of the scheduler preload, kept for `dask scheduler --preload pdbatch.dashboard` (the
documented spelling, in slurm/pdbatch.sbatch and users' own scripts)."""

from .monitoring.monitor import dask_setup

__all__ = ["dask_setup"]
