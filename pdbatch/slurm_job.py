"""Alias of pdbatch.slurm.job, kept because batch scripts written by earlier versions
(OUT/_pdbatch/job.sbatch) run `python -m pdbatch.slurm_job wait|stop`."""

import sys

from .slurm.job import main

if __name__ == "__main__":
    sys.exit(main())
