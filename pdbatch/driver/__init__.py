"""The driver: the scheduling loop, the tasks Dask runs, the worker plugin that hosts the engine,
getting a cluster, retries and quarantine, and `pdbatch run` itself (run_job)."""
