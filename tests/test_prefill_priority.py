"""On a CPU worker with both roles, prefill passes run at a lower CPU priority than decode steps
(engines/builtin/priority.py, issue 17): a real engine built as rebalancing builds it."""

from __future__ import annotations

import os
import sys
import threading

import pytest
from pipeline_helpers import DEFAULT_MODEL

from pdbatch.engines import create_engine
from pdbatch.engines.builtin.priority import PREFILL_NICE, LowPriorityPrefill
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="per-thread nice values are Linux's")


def _nice() -> int:
    return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())


@linux
def test_the_prefill_thread_runs_at_a_higher_nice_value_than_its_caller():
    lp = LowPriorityPrefill()
    try:
        assert lp.run(_nice) == min(19, _nice() + PREFILL_NICE)  # 19 is the lowest priority
        assert _nice() < lp.run(_nice)  # the caller (the decode side) keeps its own
    finally:
        lp.close()


def _options(mode: str) -> dict:
    return dict(model=DEFAULT_MODEL, dtype="float32", device="cpu", mode=mode, max_batch_tokens=1024,
                kv_budget_bytes=16 << 20, max_num_seqs=4, max_model_len=0, threads=1, engine="builtin",
                rebalance=True, enforce_eager=True)


@linux
def test_a_cpu_engine_with_both_roles_prefills_in_the_low_priority_thread(monkeypatch):
    both = create_engine("builtin", _options("disaggregated"), {"prefill", "decode"}, "w")
    only = create_engine("builtin", _options("disaggregated"), {"prefill"}, "p")
    try:
        assert both.prefills_beside_decode and not only.prefills_beside_decode
        seen = []
        run = both.prefill_engine.run
        monkeypatch.setattr(both.prefill_engine, "run", lambda reqs: seen.append(_nice()) or run(reqs))
        ids = both.tokenizer("a few words")["input_ids"]
        out = both.prefill([Request("0", ids, SamplingParams(max_new_tokens=4, ignore_eos=True))])
        assert out[0].first_token is not None and seen and seen[0] > _nice()
    finally:
        both.close()
        only.close()
