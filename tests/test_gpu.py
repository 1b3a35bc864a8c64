"""GPU code paths: what can be checked on a CPU machine runs here; the rest needs a GPU and is
skipped with the reason (the full check is scripts/gpu_check.sh, run on a real GPU)."""

from __future__ import annotations

import pytest
import torch
from distributed.protocol import deserialize, serialize

from pdbatch.config import JobConfig
from pdbatch.driver.cluster import worker_specs
from pdbatch.driver.gpu import visible_devices
from pdbatch.engines.builtin.prefill import PrefillEngine
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams

needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def test_each_worker_sees_its_own_gpu_first():
    assert [visible_devices(i, 4) for i in range(4)] == ["0,1,2,3", "1,2,3,0", "2,3,0,1", "3,0,1,2"]
    assert visible_devices(1, 1) == "0"  # one GPU: prefill and decode worker share it


def test_embedded_gpu_cluster_spec_splits_roles_across_gpus():
    specs = worker_specs(JobConfig(prefill_workers=1, decode_workers=3), "ucxx", threads=4, gpus=4)
    assert {n: s["options"]["resources"] for n, s in specs.items()} == {
        "prefill-0": {"prefill": 1}, "decode-0": {"decode": 1}, "decode-1": {"decode": 1}, "decode-2": {"decode": 1}}
    assert [s["options"]["env"]["CUDA_VISIBLE_DEVICES"][0] for s in specs.values()] == ["0", "1", "2", "3"]
    assert all(s["options"]["protocol"] == "ucxx" for s in specs.values())
    cpu = worker_specs(JobConfig(), "tcp", threads=1, gpus=0)
    assert all("CUDA_VISIBLE_DEVICES" not in s["options"]["env"] for s in cpu.values())


def test_host_packet_declines_the_cuda_family(llama):
    (packet,) = PrefillEngine(llama).run([Request("a", [5, 6, 7, 8], SamplingParams(max_new_tokens=4))])
    header, frames = serialize(packet, serializers=("cuda", "dask"))
    assert header["serializer"] == "dask"  # fell back: a host packet is never sent as "cuda"
    assert deserialize(header, frames).kv.equal(packet.kv)


@needs_gpu
def test_gpu_packet_travels_as_one_device_buffer(llama_dir):
    from pdbatch.engines.builtin.model import load_model

    lm = load_model(llama_dir, dtype="bfloat16", device="cuda")
    (packet,) = PrefillEngine(lm).run([Request("a", [5, 6, 7, 8], SamplingParams(max_new_tokens=4))])
    assert packet.kv.is_cuda and packet.kv.dtype == torch.bfloat16
    header, frames = serialize(packet, serializers=("cuda", "dask"))
    assert header["serializer"] == "cuda" and len(frames) == 1
    back = deserialize(header, frames)
    assert back.kv.is_cuda and back.kv.equal(packet.kv)
