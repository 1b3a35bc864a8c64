"""CPU tuning. pdbatch.engines.builtin.model.tune_for_cpu: the transposed weight layout and the decode
attention that reads each row's own length must leave results as they were (tests/test_engine.py
checks whole generations against Hugging Face; these check the pieces). A worker process's malloc
thresholds (driver/worker.restore_malloc_thresholds) undo what Dask's trim setting costs."""

from __future__ import annotations

import inspect
import os
import random
import subprocess
import sys

import pytest
import torch
from fixtures_models import random_prompts

from pdbatch.engines.builtin import attention
from pdbatch.engines.builtin.decode import kv_shape
from pdbatch.engines.builtin.kv_cache import SlotKVCache
from pdbatch.engines.builtin.model import load_model


@pytest.fixture(scope="module")
def plain(llama_dir):
    return load_model(llama_dir, dtype="float32", device="cpu", tuned=False)


def test_plan_runs_covers_every_slot_once_and_splits_only_when_cheaper():
    assert attention.plan_runs([]) == []
    assert attention.plan_runs([40] * 32) == [(0, 32, 40, False)]  # equal rows: one call
    assert attention.plan_runs([40, 41, 40], call_cost=96) == [(0, 3, 41, True)]  # padding < a call
    assert attention.plan_runs([600, 20, 610], call_cost=96) == [(0, 1, 600, False), (1, 2, 20, False),
                                                                  (2, 3, 610, False)]
    rng = random.Random(0)
    for _ in range(200):
        lens = [rng.randint(1, 800) for _ in range(rng.randint(1, 64))]
        runs = attention.plan_runs(lens)
        assert [i for a, b, _, _ in runs for i in range(a, b)] == list(range(len(lens)))
        for a, b, length, ragged in runs:
            assert length == max(lens[a:b]) and ragged == (min(lens[a:b]) != length)
        # never more positions read than one padded call, never fewer than the real ones
        read = sum((b - a) * length for a, b, length, _ in runs)
        assert sum(lens) <= read <= len(lens) * max(lens)


def test_tuned_weights_hold_the_same_values(llama, plain):
    tuned = dict(llama.model.named_parameters(remove_duplicate=False))
    for name, p in plain.model.named_parameters(remove_duplicate=False):
        assert tuned[name].equal(p), name
    linear = llama.model.lm_head.weight
    assert linear.t().is_contiguous()  # [in, out] in memory: one plain GEMM in F.linear
    assert llama.model.model.embed_tokens.weight.is_contiguous()  # embedding rows stay rows
    assert llama.model.config._attn_implementation == attention.NAME
    assert plain.model.config._attn_implementation == "sdpa"


def test_decode_step_over_ragged_rows_matches_padded_sdpa(llama, plain, monkeypatch):
    """One decode step over rows of very different lengths: the per-run attention gives the
    logits of transformers' SDPA over the whole padded batch, and reads less than it."""
    layers, kv_heads, head_dim = kv_shape(llama)
    lens = [5, 300, 7, 290, 120, 6, 301, 64]
    prompts = random_prompts(len(lens), llama.tokenizer.vocab_size, seed=3, max_len=400)
    caches = []
    for _ in range(2):
        cache = SlotKVCache(layers, kv_heads, head_dim, torch.float32, torch.device("cpu"), 1 << 30)
        gen = torch.Generator().manual_seed(0)
        for n in lens:
            cache.add(torch.randn(layers, 2, kv_heads, n, head_dim, generator=gen), n + 4)
        caches.append(cache)
    ids = torch.tensor([[p[0]] for p in prompts])

    read = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        read.append(k.shape[0] * k.shape[2])
        return sdpa(q, k, v, **kw)

    logits = []
    for lm, cache in ((llama, caches[0]), (plain, caches[1])):
        with monkeypatch.context() as m, torch.inference_mode(), cache.step() as (pos, mask):
            if lm is llama:  # count what the tuned model's attention reads
                m.setattr(attention.F, "scaled_dot_product_attention", spy)
            # the cache's keyword, as the engines pick it: `cache` from transformers 5.24, before it `past_key_values`
            cache_kw = "cache" if "cache" in inspect.signature(lm.model.forward).parameters else "past_key_values"
            logits.append(lm.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True,
                                   **{cache_kw: cache}).logits[:, -1])
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)  # summation order only
    padded = len(lens) * (max(lens) + 1)
    assert read and sum(read) // layers < padded  # the tuned model used the per-run path
    assert caches[0].lengths == [n + 1 for n in lens]


FAULTS = """
from malloc_probe import big_buffer_faults
from pdbatch.driver.worker import restore_malloc_thresholds

before = big_buffer_faults()
changed = restore_malloc_thresholds()
print(before, changed, big_buffer_faults())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc")
def test_worker_malloc_thresholds_undo_dasks_trim_setting():
    """With Dask's MALLOC_TRIM_THRESHOLD_=65536 every large buffer is mmapped afresh and faults
    its pages in again each time; after restore_malloc_thresholds() the heap keeps it. Without
    the setting, or with the user's own MALLOC_MMAP_THRESHOLD_, nothing is changed."""
    def run(**env):
        base = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        out = subprocess.run([sys.executable, "-c", FAULTS], env={**base, **env}, capture_output=True,
                             text=True, check=True, cwd=os.path.dirname(__file__)).stdout.split()
        return int(out[0]), out[1] == "True", int(out[2])

    before, changed, after = run(MALLOC_TRIM_THRESHOLD_="65536")
    assert changed and before > 50 * 1000  # each round faulted its 1024 pages in again
    assert after < before / 10
    assert run()[1] is False
    assert run(MALLOC_TRIM_THRESHOLD_="65536", MALLOC_MMAP_THRESHOLD_="131072")[1] is False
