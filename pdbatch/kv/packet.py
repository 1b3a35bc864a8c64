"""The KV packet: what a prefill worker hands a decode worker for one sequence.

All layers' keys and values of the real prompt tokens (no padding) live in ONE contiguous
tensor shaped [layers, 2, kv_heads, length, head_dim]. Dask ships it as a small header plus a
single raw frame (no per-layer Python objects), and `dask.sizeof` sees its true size so memory
accounting and transfer batching work.
"""

from __future__ import annotations

import pickle
import time
from dataclasses import dataclass, field

import torch

from ..engines.sampling import SamplingParams
from ..errors import IncompatibleKV


@dataclass
class KVPacket:
    seq_id: str
    prompt_ids: list[int]
    first_token: int
    kv: torch.Tensor  # [layers, 2, kv_heads, length, head_dim], contiguous
    fingerprint: str
    params: SamplingParams
    arrival_time: float  # when the prefill side received the request
    first_token_time: float  # when the first token was sampled
    prefill_worker: str | None = None
    created: float = field(default_factory=time.time)

    @property
    def length(self) -> int:
        return int(self.kv.shape[3])

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    def check_compatible(self, fingerprint: str, dtype: torch.dtype, layers: int, kv_heads: int,
                         head_dim: int) -> None:
        if self.fingerprint != fingerprint:
            raise IncompatibleKV(f"KV packet for {self.seq_id!r} was made by a different model "
                                 f"(fingerprint {self.fingerprint}, this worker has {fingerprint})")
        if self.kv.dtype != dtype:
            raise IncompatibleKV(f"KV packet for {self.seq_id!r} has dtype {self.kv.dtype}, "
                                 f"decode engine runs {dtype}")
        want = (layers, 2, kv_heads, head_dim)
        got = (self.kv.shape[0], self.kv.shape[1], self.kv.shape[2], self.kv.shape[4])
        if got != want:
            raise IncompatibleKV(f"KV packet for {self.seq_id!r} has shape {tuple(self.kv.shape)}, "
                                 f"expected [layers, 2, kv_heads, len, head_dim] = {want}")
        if self.length != len(self.prompt_ids):
            raise IncompatibleKV(f"KV packet for {self.seq_id!r} holds {self.length} positions "
                                 f"for a {len(self.prompt_ids)}-token prompt")

    # --- serialization: header (plain data) + one raw frame --------------------------------
    def header(self) -> dict:
        return {
            "seq_id": self.seq_id, "prompt_ids": self.prompt_ids, "first_token": self.first_token,
            "fingerprint": self.fingerprint, "params": self.params.to_dict(),
            "arrival_time": self.arrival_time, "first_token_time": self.first_token_time,
            "prefill_worker": self.prefill_worker, "created": self.created,
            "dtype": str(self.kv.dtype).removeprefix("torch."), "shape": list(self.kv.shape),
        }

    def frame(self) -> memoryview:
        # A flat byte view works for every dtype (bf16 included: numpy has no bf16), every layout
        # (a non-contiguous tensor is copied once) and zero-length tensors (memoryview.cast
        # refuses shapes with a zero, so the view is made 1-D by torch, not cast).
        flat = self.kv.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        return memoryview(flat.numpy())

    @classmethod
    def from_parts(cls, header: dict, frame) -> "KVPacket":
        view = memoryview(frame)
        if not view.nbytes:  # torch.frombuffer refuses an empty buffer
            return cls.from_device_buffer(header, torch.empty(0, dtype=torch.uint8))
        buf = bytearray(view) if view.readonly else view  # torch wants a writable buffer
        return cls.from_device_buffer(header, torch.frombuffer(buf, dtype=torch.uint8))

    @classmethod
    def from_device_buffer(cls, header: dict, raw: torch.Tensor) -> "KVPacket":
        """Rebuild from the header and the raw uint8 buffer (host or GPU), without a copy."""
        dtype = getattr(torch, header["dtype"])
        if raw.numel() == 0:  # zero-length packet: no bytes to reinterpret
            kv = torch.empty(header["shape"], dtype=dtype, device=raw.device)
        else:
            kv = raw.view(dtype).reshape(header["shape"])
        return cls(seq_id=header["seq_id"], prompt_ids=list(header["prompt_ids"]),
                   first_token=header["first_token"], kv=kv, fingerprint=header["fingerprint"],
                   params=SamplingParams(**header["params"]), arrival_time=header["arrival_time"],
                   first_token_time=header["first_token_time"],
                   prefill_worker=header["prefill_worker"], created=header["created"])

    def __reduce_ex__(self, protocol):
        # Plain pickle (and Dask's pickle fallback) goes through the same header + raw buffer;
        # protocol 5 passes the buffer out of band (no copy).
        frame = self.frame()
        buf = pickle.PickleBuffer(frame) if protocol >= 5 else frame.tobytes()
        return (_unpickle, (self.header(), buf))


def _unpickle(header: dict, frame) -> KVPacket:
    return KVPacket.from_parts(header, memoryview(frame))


class UnitPackets(list):
    """A prefill unit's result: its KV packets (and rows already finished or failed), in row
    order. A plain list would do, but Dask sizes a list of more than 10 items from a random
    sample of 10, and packets differ in length; this one is sized exactly, so the scheduler,
    the memory manager and the transfer log see the bytes that really move."""


def _items_serializer(families: tuple[str, ...]):
    """Serialize a UnitPackets item by item (each packet as its own raw or device frame)."""
    from distributed.protocol.serialize import deserialize, serialize

    def ser(x: UnitPackets):
        header, frames = serialize(list(x), serializers=families, iterate_collection=True)
        return {"items": header}, frames

    def de(header: dict, frames) -> UnitPackets:
        return UnitPackets(deserialize(header["items"], frames))

    return ser, de


def register_dask() -> None:
    """Teach Dask to ship KV packets and to count torch tensors at their real size."""
    from dask.sizeof import sizeof
    from distributed.protocol import dask_deserialize, dask_serialize

    @dask_serialize.register(KVPacket)
    def _ser(p: KVPacket):
        return p.header(), [p.frame()]

    @dask_deserialize.register(KVPacket)
    def _de(header, frames):
        return KVPacket.from_parts(header, frames[0])

    @sizeof.register(KVPacket)
    def _sizeof_packet(p: KVPacket) -> int:
        return p.nbytes + 64 * len(p.prompt_ids) + 512

    @sizeof.register(UnitPackets)
    def _sizeof_unit(u: UnitPackets) -> int:
        return 64 + sum(sizeof(x) for x in u)

    ser, de = _items_serializer(("dask", "pickle"))
    dask_serialize.register(UnitPackets)(ser)
    dask_deserialize.register(UnitPackets)(de)

    from .cuda import register_cuda_serialization

    register_cuda_serialization(KVPacket, UnitPackets, _items_serializer(("cuda", "dask", "pickle")))

    @sizeof.register(torch.Tensor)
    def _sizeof_tensor(t: torch.Tensor) -> int:
        return t.numel() * t.element_size() + 128


register_dask()
