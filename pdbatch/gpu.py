"""GPU specifics, kept out of the CPU path: per-GPU worker placement for the embedded cluster,
the RMM pool, and moving KV packets device-to-device through Dask's "cuda" serializer family.

Everything here imports CUDA libraries lazily, so a CPU-only install imports this module fine
and never takes these branches.
"""

from __future__ import annotations

import torch

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


def register_cuda_serialization(packet_cls, unit_cls, unit_serializer) -> None:
    """KV packets whose tensor is on a GPU travel as one device buffer through the "cuda"
    family (used by the UCX comm): no host staging. A CPU packet declines (NotImplementedError)
    so Dask falls back to the "dask" family's raw host frame. A unit's list of packets goes
    through the same family item by item."""
    from distributed.protocol.cuda import cuda_deserialize, cuda_serialize

    unit_ser, unit_de = unit_serializer
    cuda_serialize.register(unit_cls)(unit_ser)
    cuda_deserialize.register(unit_cls)(unit_de)

    @cuda_serialize.register(packet_cls)
    def _ser(p):
        if p.kv.device.type != "cuda":
            raise NotImplementedError("KV packet is on the host")
        flat = p.kv.detach().contiguous().view(torch.uint8).reshape(-1)
        return p.header(), [flat]  # a CUDA tensor exposes __cuda_array_interface__

    @cuda_deserialize.register(packet_cls)
    def _de(header, frames):
        (frame,) = frames
        # the receiving comm allocated `frame` on this worker's GPU (RMM): wrap it, no copy
        buf = torch.as_tensor(frame, device="cuda")
        return packet_cls.from_device_buffer(header, buf)
