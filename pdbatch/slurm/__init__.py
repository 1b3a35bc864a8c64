"""Slurm: `pdbatch submit` (submit.py) and what the batch script runs between its steps (job.py)."""
