"""Prefill and decode engines against Hugging Face `generate` (greedy, one prompt at a time)."""

from __future__ import annotations

import pickle
import random
import subprocess
import sys
import time

import pytest
import torch
from distributed.protocol import deserialize_bytes, serialize_bytes
from fixtures_models import hf_greedy, random_prompts

from pdbatch.engines.builtin.decode import DecodeEngine, generate, kv_shape
from pdbatch.engines.builtin.kv_cache import SlotKVCache
from pdbatch.engines.builtin.model import load_model
from pdbatch.engines.builtin.prefill import PrefillEngine, length_buckets
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams
from pdbatch.kv.packet import KVPacket


def greedy_requests(lm, n=56, seed=0, max_len=160):
    rng = random.Random(seed + 1)
    prompts = random_prompts(n, lm.tokenizer.vocab_size, seed=seed, max_len=max_len)
    return [Request(f"r{i}", p, SamplingParams(max_new_tokens=rng.randint(1, 24), ignore_eos=True))
            for i, p in enumerate(prompts)]


def assert_matches_hf(lm, requests, outputs):
    assert [o.id for o in outputs] == [r.id for r in requests]
    for r, o in zip(requests, outputs):
        assert o.error is None, (r.id, o.error)
        ref = hf_greedy(lm, r.prompt_ids, r.params.max_new_tokens)
        assert o.output_token_ids == ref, f"{r.id} (prompt {len(r.prompt_ids)} tokens) differs from HF generate"
        assert o.finish_reason == "length"
    # random weights are tuned to give varied outputs: a constant output would hide bugs
    assert len({t for o in outputs for t in o.output_token_ids}) > 50


def submit_in_two_waves(engine: DecodeEngine, items, submit):
    """Half now, the rest once the engine is mid-decode: arrivals while others generate."""
    half = len(items) // 2
    futs = [submit(x) for x in items[:half]]
    deadline = time.time() + 60
    while engine.stats.steps < 3 and time.time() < deadline:
        time.sleep(0.005)
    assert engine.stats.steps >= 3 and any(not f.done() for f in futs), "second wave must arrive mid-decode"
    futs += [submit(x) for x in items[half:]]
    return [f.result(timeout=300) for f in futs]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_colocated_engine_matches_hf_with_arrivals_mid_decode(family, request):
    lm = request.getfixturevalue(family)
    reqs = greedy_requests(lm)
    engine = DecodeEngine(lm, prefill=PrefillEngine(lm, max_batch_tokens=1024), max_num_seqs=64)
    try:
        outs = submit_in_two_waves(engine, reqs, engine.submit_request)
    finally:
        engine.close()
    assert_matches_hf(lm, reqs, outs)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_disaggregated_engines_match_hf_with_arrivals_mid_decode(family, request):
    lm = request.getfixturevalue(family)
    reqs = greedy_requests(lm, seed=7)
    results = PrefillEngine(lm, max_batch_tokens=2048).run(reqs)
    packets = [p for p in results if isinstance(p, KVPacket)]
    # rows asking for one token are finished by prefill: their KV never needs to move
    assert len(packets) == sum(r.params.max_new_tokens > 1 for r in reqs) > 40
    # the packet holds only real tokens: no padding, one contiguous buffer
    for r, p in zip(reqs, results):
        if isinstance(p, KVPacket):
            assert p.kv.shape[3] == len(r.prompt_ids) and p.kv.is_contiguous()
    engine = DecodeEngine(lm, max_num_seqs=24)  # fewer slots than sequences: admission waits
    try:
        decoded = iter(submit_in_two_waves(engine, packets, engine.submit))
    finally:
        engine.close()
    outs = [next(decoded) if isinstance(p, KVPacket) else p for p in results]
    assert_matches_hf(lm, reqs, outs)


def test_decode_leaves_the_cores_to_a_prefill_running_beside_it(llama):
    """A decoder that prefills in its spare time (rebalancing on a CPU): while that prefill runs,
    decode steps take at most DECODE_SHARE_BESIDE_PREFILL of the time, so its CPU goes to the
    prefill and later rows join the running batch; outputs are unchanged."""
    from pdbatch.engines.builtin.decode import DECODE_SHARE_BESIDE_PREFILL

    reqs = greedy_requests(llama, n=12, seed=3)
    for r in reqs:
        r.params.max_new_tokens = 40
    packets = PrefillEngine(llama, max_batch_tokens=2048).run(reqs)
    engine = DecodeEngine(llama, max_num_seqs=16)
    try:
        with engine.beside_prefill():
            t0 = time.perf_counter()
            futs = [engine.submit(p) for p in packets[:6]]
            while engine.stats.steps < 20:
                time.sleep(0.001)
            paced_wall, paced = time.perf_counter() - t0, list(engine.stats.step_log)
        futs += [engine.submit(p) for p in packets[6:]]
        outs = [f.result(timeout=300) for f in futs]
    finally:
        engine.close()
    # a pause of at least the step's own time after every step but the last seen
    busy = sum(dt for _, dt in paced[:-1])
    assert paced_wall >= busy / DECODE_SHARE_BESIDE_PREFILL * 0.95
    assert_matches_hf(llama, reqs, outs)


def test_what_a_fresh_kv_pool_held_never_reaches_a_row(llama, monkeypatch):
    """The decode pool is allocated without zero-filling (kv_cache.py: the page faults stalled
    the loop). Whatever the allocation left there must never reach an output: with NaN in
    every fresh pool, rows of different lengths decoding together (a batch's attention reads
    each row up to the longest, masked), growing the pool and reusing freed slots, still equal
    HF generate."""
    monkeypatch.setattr(SlotKVCache, "_uninitialised", staticmethod(
        lambda shape, dtype, device: torch.full(shape, float("nan"), dtype=dtype, device=device)))
    reqs = greedy_requests(llama, seed=3)
    results = PrefillEngine(llama, max_batch_tokens=2048).run(reqs)
    packets = [p for p in results if isinstance(p, KVPacket)]
    engine = DecodeEngine(llama, max_num_seqs=24)  # fewer slots than rows: slots are reused
    try:
        decoded = iter(submit_in_two_waves(engine, packets, engine.submit))
        grown = engine.cache.slots
    finally:
        engine.close()
    assert grown > 1
    assert_matches_hf(llama, reqs, [next(decoded) if isinstance(p, KVPacket) else p for p in results])


def test_a_long_row_after_a_wide_pool_of_short_ones_is_decoded(llama):
    """Seen on the prefill-heavy bench workload: the KV pool grew to many slots for short rows;
    once they were done, a long row fitted the budget alone but not that many slots of its
    length, and the decode loop spun for ever on it. An idle pool is reshaped for it."""
    short = [Request(f"s{i}", p, SamplingParams(max_new_tokens=4, ignore_eos=True))
             for i, p in enumerate(random_prompts(16, llama.tokenizer.vocab_size, seed=11, min_len=8, max_len=16))]
    long = Request("long", random_prompts(1, llama.tokenizer.vocab_size, seed=12, min_len=600, max_len=600)[0],
                   SamplingParams(max_new_tokens=8, ignore_eos=True))
    prefill = PrefillEngine(llama, max_batch_tokens=2048)
    per_token = 2 * llama.model.config.num_hidden_layers * kv_shape(llama)[1] * kv_shape(llama)[2] * 4
    engine = DecodeEngine(llama, kv_budget_bytes=1000 * per_token, max_num_seqs=64)  # 16 x 64 positions fit
    try:
        futs = [engine.submit(p) for p in prefill.run(short)]
        outs = [f.result(timeout=60) for f in futs]
        wide = engine.cache.slots
        assert wide >= 8 and engine.cache.pool_bytes(wide, 608) > engine.cache.budget_bytes
        out = engine.submit(prefill.run([long])[0]).result(timeout=60)
    finally:
        engine.close()
    assert_matches_hf(llama, [*short, long], [*outs, out])


def test_length_buckets_respect_token_budget():
    lengths = [5, 300, 7, 120, 64, 64, 900, 3]
    batches = length_buckets(lengths, max_batch_tokens=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = max(lengths[i] for i in b)
        assert len(b) == 1 or len(b) * longest <= 256


def test_length_buckets_cap_padding_share():
    """With a padding cap a prompt joins a batch only while padding stays under that share of
    the pass (CPU prefill: a padded token costs what a real one does); without it, only the
    token budget limits a batch."""
    lengths = [100, 104, 108, 150, 160, 400, 40, 44]
    capped = length_buckets(lengths, max_batch_tokens=4096, max_padding_share=0.1)
    assert sorted(i for b in capped for i in b) == list(range(len(lengths)))
    for b in capped:
        longest = max(lengths[i] for i in b)
        assert len(b) * longest - sum(lengths[i] for i in b) <= 0.1 * len(b) * longest
    assert sorted(map(sorted, capped)) == [[0, 1, 2], [3, 4], [5], [6, 7]]
    assert len(length_buckets(lengths, max_batch_tokens=4096)) == 1


def test_prefill_runs_the_passes_of_rows_asking_fewest_tokens_last(llama):
    """A unit's packets leave together when its last pass ends, and a row's wait since its first
    token counts in its TPOT, divided over its output tokens: passes whose rows ask for the
    fewest tokens run last. Each prompt is its own pass here (the token budget holds one)."""
    reqs = greedy_requests(llama, n=8, seed=11, max_len=60)
    for r, n in zip(reqs, (5, 40, 2, 33, 17, 9, 28, 3)):
        r.prompt_ids = r.prompt_ids[:40] + [5] * (40 - len(r.prompt_ids[:40]))
        r.params.max_new_tokens = n
    packets = PrefillEngine(llama, max_batch_tokens=40).run(reqs)
    assert all(isinstance(p, KVPacket) for p in packets)
    by_time = sorted(zip(packets, reqs), key=lambda x: x[0].first_token_time)
    assert [r.params.max_new_tokens for _, r in by_time] == [40, 33, 28, 17, 9, 5, 3, 2]


def test_colocated_prefill_batches_group_waiting_prompts_by_length(llama):
    """A colocated prefill pass takes the oldest waiting prompt and its neighbours by length,
    not the next prompts in arrival order (which would mix 10- and 200-token prompts and pay
    for the padding); every prompt still completes."""
    engine = DecodeEngine(llama, prefill=PrefillEngine(llama, max_batch_tokens=400), max_num_seqs=64)
    engine.prefill.max_padding_share = None  # grouping by length alone (the cap: the test above)
    lens = [200, 10, 190, 12, 180, 11, 8, 195]
    try:
        with engine._cv:  # the loop waits on this lock: nothing is prefilled until it is released
            params = SamplingParams(max_new_tokens=3, ignore_eos=True)
            futs = [engine.submit_request(Request(str(i), [5 + i] * n, params)) for i, n in enumerate(lens)]
            first = engine._take_prefill_batch()
            second = engine._take_prefill_batch()
            left = list(engine._prompts)
            engine._prompts.extendleft(reversed(first + second))
        assert [r.id for r, _ in first] == ["0", "7"]  # the head (200) with 195: 2 x 200 <= 400
        assert [r.id for r, _ in second] == ["1", "3", "5", "6"]  # the new head (10) with 8, 11, 12
        assert [r.id for r, _ in left] == ["2", "4"]
        outs = [f.result(timeout=60) for f in futs]
    finally:
        engine.close()
    assert [o.error for o in outs] == [None] * len(lens)
    assert [len(o.output_token_ids) for o in outs] == [3] * len(lens)


def test_colocated_prefill_waits_for_several_free_slots_while_decoding(llama):
    """With sequences decoding, a slot frees about once a step; a prefill pass then waits until
    a few are free (PREFILL_MIN_FREE_SHARE of them, or all the waiting prompts fit) instead of
    prefilling one prompt per freed slot. Every row still completes with its own length."""
    from pdbatch.engines.builtin import decode

    slots = 64
    min_free = int(slots * decode.PREFILL_MIN_FREE_SHARE)
    assert min_free >= 4
    engine = DecodeEngine(llama, prefill=PrefillEngine(llama, max_batch_tokens=1024), max_num_seqs=slots)
    engine.prefill.max_padding_share = None  # pass sizes set by free slots alone
    passes, run = [], engine.prefill.run

    def recording_run(requests):  # called on the engine's thread, so engine state is stable here
        passes.append((len(requests), len(engine._prompts), len(engine.active)))
        return run(requests)

    engine.prefill.run = recording_run
    rng = random.Random(7)
    reqs = [Request(str(i), [5 + i % 50] * rng.randint(4, 24),
                    SamplingParams(max_new_tokens=rng.randint(1, 30), ignore_eos=True)) for i in range(200)]
    try:
        with engine._cv:  # all queued before the loop takes its first pass
            futs = [engine.submit_request(r) for r in reqs]
        outs = [f.result(timeout=120) for f in futs]
    finally:
        engine.close()
    assert [len(o.output_token_ids) for o in outs] == [r.params.max_new_tokens for r in reqs]
    while_decoding = [(n, left) for n, left, active in passes if active]
    assert len(while_decoding) >= 5, passes  # the test must exercise passes between decode steps
    assert all(n >= min(min_free, n + left) for n, left in while_decoding), passes


def test_packet_made_in_another_process_decodes_the_same(llama, llama_dir, tmp_path):
    reqs = greedy_requests(llama, n=12, seed=3)
    for r in reqs:
        r.params.max_new_tokens = 8
    blob = tmp_path / "packets.bin"
    script = (
        "import pickle, sys, torch; torch.set_num_threads(1)\n"
        "from distributed.protocol import serialize_bytes\n"
        "from pdbatch.engines.builtin.model import load_model\n"
        "from pdbatch.engines.builtin.prefill import PrefillEngine\n"
        f"lm = load_model({llama_dir!r}, dtype='float32', device='cpu')\n"
        f"reqs = pickle.loads({pickle.dumps(reqs)!r})\n"
        "packets = PrefillEngine(lm).run(reqs)\n"
        f"open({str(blob)!r}, 'wb').write(serialize_bytes(packets))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    remote = deserialize_bytes(blob.read_bytes())
    local = PrefillEngine(llama).run(reqs)
    assert [p.first_token for p in remote] == [p.first_token for p in local]
    engine = DecodeEngine(llama)
    try:
        out_remote = [f.result() for f in [engine.submit(p) for p in remote]]
        out_local = [f.result() for f in [engine.submit(p) for p in local]]
    finally:
        engine.close()
    assert [o.output_token_ids for o in out_remote] == [o.output_token_ids for o in out_local]


def test_packet_serializes_as_one_raw_frame(llama):
    (packet,) = PrefillEngine(llama).run(greedy_requests(llama, n=1))
    from dask.sizeof import sizeof
    from distributed.protocol import serialize

    header, frames = serialize(packet, serializers=("dask",))
    assert header["serializer"] == "dask"
    assert sum(memoryview(f).nbytes for f in frames) >= packet.nbytes
    assert max(memoryview(f).nbytes for f in frames) == packet.nbytes  # all KV in one buffer
    assert sizeof(packet) >= packet.nbytes
    again = deserialize_bytes(serialize_bytes(packet))
    assert again.kv.equal(packet.kv) and again.params == packet.params
    assert pickle.loads(pickle.dumps(packet)).kv.equal(packet.kv)


def test_a_units_packets_are_sized_exactly_and_travel_as_own_frames(llama):
    """Dask sizes a plain list of more than 10 items from a sample; a unit's result must be
    counted at its real size (memory accounting, transfer log) and still ship each packet raw."""
    from dask.sizeof import sizeof
    from distributed.protocol.serialize import merge_and_deserialize, serialize_and_split

    from pdbatch.kv.packet import UnitPackets

    packets = [p for p in PrefillEngine(llama).run(greedy_requests(llama, n=30)) if isinstance(p, KVPacket)]
    assert len(packets) > 20
    unit = UnitPackets(packets)
    assert sizeof(unit) == 64 + sum(sizeof(p) for p in packets)
    assert sizeof(unit) >= sum(p.nbytes for p in packets)
    header, frames = serialize_and_split(unit, serializers=("dask", "pickle"))
    assert header["serializer"] == "dask"
    sizes = sorted(memoryview(f).nbytes for f in frames)
    assert all(p.nbytes in sizes for p in packets)  # one raw frame per packet, not one pickle
    again = merge_and_deserialize(header, frames)
    assert isinstance(again, UnitPackets)
    assert [p.seq_id for p in again] == [p.seq_id for p in packets]
    assert all(a.kv.equal(p.kv) for a, p in zip(again, packets))


def test_packet_from_a_different_model_is_refused(llama, llama_other_dir):
    other = load_model(llama_other_dir, dtype="float32", device="cpu")
    reqs = greedy_requests(other, n=3)
    foreign = PrefillEngine(other).run(reqs)
    engine = DecodeEngine(llama)
    try:
        outs = [engine.submit(p).result(timeout=60) for p in foreign]
    finally:
        engine.close()
    for o in outs:
        assert o.error and "different model" in o.error
        assert o.output_token_ids == []


def test_seeded_sampling_does_not_depend_on_batch(llama):
    prompts = random_prompts(12, llama.tokenizer.vocab_size, seed=11, max_len=80)
    params = [SamplingParams(temperature=0.9, top_p=0.9, top_k=40, seed=1000 + i, max_new_tokens=16,
                             ignore_eos=True) for i in range(len(prompts))]
    reqs = [Request(f"s{i}", p, params[i]) for i, p in enumerate(prompts)]

    def fresh():
        return [Request(r.id, r.prompt_ids, SamplingParams(**r.params.to_dict())) for r in reqs]

    together = generate(llama, fresh(), max_batch_tokens=4096)
    alone = [generate(llama, [r])[0] for r in fresh()]
    noise = [Request(f"n{i}", p, SamplingParams(temperature=1.3, seed=i, max_new_tokens=30, ignore_eos=True))
             for i, p in enumerate(random_prompts(20, llama.tokenizer.vocab_size, seed=99))]
    mixed = generate(llama, noise[:10] + fresh() + noise[10:], max_batch_tokens=512)[10:22]
    disagg = generate(llama, fresh(), colocated=False)
    for a, b, c, d in zip(together, alone, mixed, disagg):
        assert a.output_token_ids == b.output_token_ids == c.output_token_ids == d.output_token_ids
    greedy = [hf_greedy(llama, r.prompt_ids, 16) for r in reqs]
    assert sum(o.output_token_ids != g for o, g in zip(together, greedy)) >= 6  # it really samples
    other_seed = generate(llama, [Request("x", prompts[0], SamplingParams(**{**params[0].to_dict(), "seed": 5}))])
    assert other_seed[0].output_token_ids != together[0].output_token_ids


def test_bad_requests_fail_alone(llama):
    ctx = llama.max_model_len
    good = greedy_requests(llama, n=6, seed=5)
    bad = [
        Request("empty", [], SamplingParams()),
        Request("too-long", [5] * ctx, SamplingParams()),
        Request("neg-temp", [5, 6, 7], SamplingParams(temperature=-1.0)),
        Request("top-p", [5, 6, 7], SamplingParams(top_p=1.5)),
        Request("zero-new", [5, 6, 7], SamplingParams(max_new_tokens=0)),
        Request("top-k", [5, 6, 7], SamplingParams(top_k=-7)),
    ]
    mixed = good[:3] + bad + good[3:]
    for colocated in (True, False):
        fresh = [Request(r.id, list(r.prompt_ids), SamplingParams(**r.params.to_dict())) for r in mixed]
        outs = {o.id: o for o in generate(llama, fresh, colocated=colocated)}
        for r in bad:
            assert outs[r.id].error, r.id
            assert outs[r.id].output_token_ids == []
        assert "context window" in outs["too-long"].error
        assert "temperature" in outs["neg-temp"].error
        for r in good:
            assert outs[r.id].error is None
            assert outs[r.id].output_token_ids == hf_greedy(llama, r.prompt_ids, r.params.max_new_tokens)


def test_huge_max_new_tokens_is_clamped_to_context(gpt2):
    prompt = random_prompts(1, gpt2.tokenizer.vocab_size, seed=4, min_len=500, max_len=500)[0]
    (out,) = generate(gpt2, [Request("big", prompt, SamplingParams(max_new_tokens=10**9, ignore_eos=True))])
    assert out.error is None and out.finish_reason == "length"
    assert len(prompt) + out.num_generated_tokens == gpt2.max_model_len


def test_eos_stop_strings_and_stop_ids(llama):
    prompts = random_prompts(20, llama.tokenizer.vocab_size, seed=21, max_len=40)
    refs = [hf_greedy(llama, p, 12) for p in prompts]
    # stop token id: pick the 3rd generated token of each row; output must end right there
    outs = generate(llama, [Request(f"t{i}", p, SamplingParams(max_new_tokens=12, stop_token_ids=[ref[2]],
                                                                ignore_eos=True))
                            for i, (p, ref) in enumerate(zip(prompts, refs))])
    for o, ref in zip(outs, refs):
        cut = ref.index(ref[2]) + 1
        assert o.output_token_ids == ref[:cut] and o.finish_reason == "stop"
    # stop string: the text is cut before it, finish_reason "stop"
    tok = llama.tokenizer
    full = [tok.decode(r, skip_special_tokens=True) for r in refs]
    rows = [(i, t[len(t) // 2:len(t) // 2 + 2]) for i, t in enumerate(full) if len(t.strip()) > 6]
    outs = generate(llama, [Request(f"s{i}", prompts[i], SamplingParams(max_new_tokens=12, stop=[s],
                                                                         ignore_eos=True)) for i, s in rows])
    for (i, s), o in zip(rows, outs):
        assert o.finish_reason == "stop" and s not in o.generated_text
        assert full[i].startswith(o.generated_text)
    # EOS ends a row (and stays in output_token_ids) unless ignore_eos
    eos = llama.eos_token_ids[0]
    outs = generate(llama, [Request(f"e{i}", p, SamplingParams(max_new_tokens=12, stop_token_ids=[]))
                            for i, p in enumerate(prompts)])
    for o, p in zip(outs, prompts):
        assert o.output_token_ids == hf_greedy(llama, p, 12, stop_at_eos=True)
        assert (o.finish_reason == "stop") == (eos in o.output_token_ids)


def test_builtin_engine_behind_the_seam(llama, llama_dir):
    """What the worker side sees (pdbatch.engines): a prefill engine's packets decoded by a
    decode engine, and a colocated one, give Hugging Face's tokens; stats and load add up."""
    from pdbatch.engines import Engine, create_engine
    from pdbatch.errors import UserError

    opts = dict(model=llama_dir, dtype="float32", device="cpu", mode="disaggregated", max_batch_tokens=1024,
                kv_budget_bytes=1 << 28, max_num_seqs=32, max_model_len=0, threads=0, engine="builtin")
    reqs = greedy_requests(llama, n=10, seed=5)
    for r in reqs:  # at least one decode step each: every prefill result is a packet
        r.params.max_new_tokens = max(2, r.params.max_new_tokens)
    prefill = create_engine("builtin", opts, {"prefill"}, "p0")
    decode = create_engine("builtin", opts, {"decode"}, "d0")
    colocated = create_engine("builtin", {**opts, "mode": "colocated"}, {"prefill", "decode"}, "c0")
    try:
        assert isinstance(prefill, Engine) and prefill.kind == "builtin" and decode.roles == {"decode"}
        assert prefill.vocab_size == llama.model.get_input_embeddings().num_embeddings
        assert prefill.max_model_len == llama.max_model_len and prefill.tokenizer is not None
        assert prefill.load() == {"active": 0, "queued": 0, "kv_budget_bytes": 0, "kv_free_bytes": 0}
        packets = prefill.prefill(reqs)
        assert all(isinstance(p, KVPacket) for p in packets)
        outs = [f.result(timeout=300) for f in [decode.submit_packet(p, 0.0) for p in packets]]
        for r, o in zip(reqs, outs):
            assert o.output_token_ids == hf_greedy(llama, r.prompt_ids, r.params.max_new_tokens)
            assert (o.prefill_worker, o.decode_worker) == ("p0", "d0")
        colo = [f.result(timeout=300) for f in [colocated.submit_request(Request(r.id, r.prompt_ids, r.params))
                                                 for r in reqs]]
        assert [o.output_token_ids for o in colo] == [o.output_token_ids for o in outs]
        ps, ds, cs = prefill.stats(), decode.stats(), colocated.stats()
        assert ps.prefill_tokens == sum(len(r.prompt_ids) for r in reqs) == cs.prefill_tokens
        assert ps.decode_steps == 0 and ds.prefill_tokens == 0 and ds.kv_packets == len(reqs)
        assert ds.decode_tokens == sum(len(o.output_token_ids) - 1 for o in outs)  # the first is prefill's
        assert 0 < len(ds.recent_step_s) <= 32 and 0 < ds.kv_pool_peak_bytes <= ds.kv_budget_bytes == 1 << 28
        assert decode.load()["kv_budget_bytes"] == 1 << 28
        with pytest.raises(RuntimeError, match="no decode role"):
            prefill.submit_packet(packets[0])
    finally:
        for e in (prefill, decode, colocated):
            e.close()
    with pytest.raises(UserError, match="unknown engine 'nope'"):
        create_engine("nope", opts, {"prefill"})
