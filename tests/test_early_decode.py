"""A decode task's rows start decoding when the task is ready, while the worker's one Dask thread
is still busy with a prefill (driver/early_decode.py, issue 17). A real Dask worker with the
real engine plugin and the bundled tiny model; outputs checked against Hugging Face `generate`."""

from __future__ import annotations

import pyarrow as pa
import torch
from fixtures_models import hf_greedy
from pipeline_helpers import DEFAULT_MODEL, hold_thread, wait_for, wait_task_states

from pdbatch.driver.pipeline import submit_on
from pdbatch.driver.tasks import decode_unit, prefill_unit
from pdbatch.driver.worker import PLUGIN_NAME, EngineHost
from pdbatch.engines.builtin.model import load_model
from pdbatch.engines.sampling import SamplingParams
from pdbatch.io.dataset import ROW_ID

NEW = 12


def test_a_ready_decode_decodes_while_the_worker_thread_prefills():
    from distributed import Client, Event, LocalCluster

    prompts = [f"Row {i}: a few words about {i}." for i in range(3)]
    rows = pa.table({"prompt": prompts, ROW_ID: [str(i) for i in range(3)]})
    columns = {"prompt": "prompt", "messages": None, "sampling": []}
    defaults = SamplingParams(max_new_tokens=NEW, ignore_eos=True)
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        client.register_plugin(EngineHost(model=DEFAULT_MODEL, dtype="float32", device="cpu", mode="disaggregated",
                                          max_batch_tokens=1024, kv_budget_bytes=64 << 20, max_num_seqs=8,
                                          max_model_len=0, threads=1, rebalance=True))
        worker = cluster.workers[0]
        host = worker.plugins[PLUGIN_NAME]
        prefilled = submit_on(client, worker.address, "prefill", "prefill-u-0", prefill_unit, rows, columns, defaults)
        prefilled.result()
        gate = Event("gate", client=client)
        running = submit_on(client, worker.address, "prefill", "prefill-running", hold_thread, "gate")
        wait_task_states(worker, **{"prefill-running": "executing"})
        decode = submit_on(client, worker.address, "decode", "decode-u-0", decode_unit, prefilled, prefilled.key)
        # every row decodes to its end while the worker's only thread is still taken
        wait_for(lambda: host.engine.stats().decode_tokens >= len(prompts) * (NEW - 1), 60,
                 "the rows to decode while the thread is busy")
        assert worker.state.tasks["decode-u-0"].state == "ready"
        gate.set()
        outs = decode.result()
        assert running.result() > 0
        assert host.engine.stats().kv_packets == len(prompts)  # handed to the engine once, not again by the task
        assert host.early_decode.take("decode-u-0") is None

    torch.set_num_threads(1)
    lm = load_model(DEFAULT_MODEL, dtype="float32", device="cpu")
    for p, o in zip(prompts, outs):
        assert o.error is None
        assert o.output_token_ids == hf_greedy(lm, lm.tokenizer(p)["input_ids"], NEW)
