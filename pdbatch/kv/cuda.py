"""KV packets through Dask's "cuda" serializer family: a packet on a GPU travels as one device
buffer (UCX comm, device to device); on the host it declines and takes the "dask" family.

CUDA libraries are imported lazily, so a CPU-only install imports this module fine.
"""

from __future__ import annotations

import torch


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
