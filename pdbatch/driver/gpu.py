"""GPU specifics of the driver, kept out of the CPU path: per-GPU worker placement for the
embedded cluster and the RMM pool (KV packets' device-to-device path: pdbatch.kv.cuda).

Everything here imports CUDA libraries lazily, so a CPU-only install imports this module fine
and never takes these branches.
"""

from __future__ import annotations

# Environment for UCXX on GPU workers: create the CUDA context before UCX starts, so UCX can
# register device memory (distributed-ucxx reads this setting at comm start).
UCX_GPU_ENV = {"DASK_DISTRIBUTED_UCXX__CREATE_CUDA_CONTEXT": "True", "UCX_WARN_UNUSED_ENV_VARS": "n"}


def visible_devices(index: int, gpus: int) -> str:
    """CUDA_VISIBLE_DEVICES for worker `index`: its own GPU first (so it is cuda:0 there), the
    way dask-cuda does it. With more workers than GPUs, workers share GPUs round-robin (e.g. one
    prefill and one decode worker on a single-GPU test machine)."""
    first = index % gpus
    return ",".join(str((first + k) % gpus) for k in range(gpus))


def gpu_worker_options(index: int, gpus: int, rmm_pool_size: str | None) -> dict:
    """Extra Nanny options for the embedded cluster's worker number `index`."""
    opts: dict = {"env": {"CUDA_VISIBLE_DEVICES": visible_devices(index, gpus), **UCX_GPU_ENV}}
    if rmm_pool_size:
        from dask_cuda.plugins import RMMSetup  # noqa: PLC0415  (GPU installs only)

        # One RMM pool per worker, and torch allocating from it (dask-cuda's documented way,
        # `--set-rmm-allocator-for-libs torch`): UCX receive buffers and torch tensors then
        # share one pool instead of two allocators fighting over the same GPU memory.
        opts["plugins"] = {RMMSetup(initial_pool_size=rmm_pool_size, maximum_pool_size=None,
                                    managed_memory=False, async_alloc=False, release_threshold=None,
                                    log_directory=None, track_allocations=False,
                                    external_lib_list=["torch"])}
    return opts
