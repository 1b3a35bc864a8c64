"""Work units sized to the job, and prefill/decode roles moved while it runs (issue 17).

The job tests run the real `pdbatch run` on its embedded cluster of separate worker processes
and compare every row with Hugging Face greedy `generate`, one prompt at a time. The rules of
driver/roles.py and the dashboard's roles view are also checked on their own, without a cluster.
"""

from __future__ import annotations

import json
import shutil
import time

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_models import hf_greedy
from pipeline_helpers import (DEFAULT_MODEL, hold_thread, manifest_units, read_report, read_rows, run_cli, run_clis,
                              wait_task_states)

from pdbatch.driver.decode_progress import DecodeProgress
from pdbatch.driver.pacing import DecodeRate, DecodeSlots, may_prefill
from pdbatch.driver.pipeline import submit_on
from pdbatch.driver import roles as roles_mod
from pdbatch.driver.roles import PREFILL_DEPTH, Roles, View, auto_unit_rows
from pdbatch.engines.builtin.model import load_model
from pdbatch.monitoring.dashboard_page import roles_html
from pdbatch.monitoring.monitor import Monitor

NEW = 40  # tokens per row, EOS ignored: decode outweighs prefill, so prefill runs dry and roles move


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # the references: one thread is much faster than two fighting the cluster
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu")


def make_input(path, n: int) -> list[str]:
    prompts = [f"Row {i}: a few words about the number {i}." for i in range(n)]
    pq.write_table(pa.table({"prompt": prompts}), path)
    return prompts


def expected(tiny, prompts, n: int = NEW) -> dict[str, list[int]]:
    return {f"in.parquet:{i}": hf_greedy(tiny, tiny.tokenizer(p)["input_ids"], n) for i, p in enumerate(prompts)}


def outputs(out) -> dict[str, list[int]]:
    rows = read_rows(out)
    assert all(r["error"] is None for r in rows), [r["error"] for r in rows if r["error"]][:3]
    return {r["id"]: r["output_token_ids"] for r in rows}


@pytest.fixture(scope="module")
def sixty(tmp_path_factory, tiny):
    """The 60-row input of the issue and its HF references."""
    tmp = tmp_path_factory.mktemp("sixty")
    prompts = make_input(tmp / "in.parquet", 60)
    return tmp, expected(tiny, prompts)


def default_args(inp, out) -> list:
    return ["run", inp, "-o", out, "--max-new-tokens", NEW, "--ignore-eos", "--progress", "none"]


@pytest.fixture(scope="module")
def default_run(sixty):
    """`pdbatch run` of the 60 rows with run's defaults (auto units, rebalancing on): the
    unit-size and rebalancing tests both read this one run."""
    out = sixty[0] / "default"
    res = run_cli(*default_args(sixty[0] / "in.parquet", out))
    assert res.returncode == 0, res.stderr
    return out, res


# --- unit sizing --------------------------------------------------------------------------------

def test_auto_unit_rows_rule():
    assert auto_unit_rows(60, 2) == 10  # 6 units: 3 per worker
    assert auto_unit_rows(60, 16) == 1  # every worker gets work early on a big cluster
    assert auto_unit_rows(32, 2) == 5  # 7 units: never fewer than 3 a worker
    assert auto_unit_rows(3, 2) == 1 and auto_unit_rows(0, 2) == 1
    assert auto_unit_rows(10**6, 64) == 128  # big inputs: a decode batch's worth, the resume grain


def test_sixty_rows_are_several_units_and_a_resume_keeps_the_size(sixty, default_run, tmp_path):
    inp, want = sixty[0] / "in.parquet", sixty[1]
    first, res = default_run
    r = read_report(first)
    assert (r["units"], r["unit_rows"], r["unit_rows_source"]) == (6, 10, "auto")  # not one unit of 60
    assert "60 rows in 6 units of 10 rows (auto" in res.stderr
    assert outputs(first) == want
    assert json.loads((first / "_pdbatch" / "job.json").read_text())["unit_rows"] == 10  # the bookkeeping
    # a crash lost the last three units; the rerun has 3 workers (auto would now pick 7 rows)
    out = tmp_path / "out"
    shutil.copytree(first, out)
    manifest = out / "_pdbatch" / "manifest.jsonl"
    entries = [json.loads(line) for line in manifest.read_text().splitlines() if line.strip()]
    kept, lost = entries[:3], entries[3:]
    manifest.write_text("".join(json.dumps(e) + "\n" for e in kept))
    (out / "_SUCCESS").unlink()
    # beside it, on a new output directory: an explicit --unit-rows wins
    explicit = tmp_path / "explicit"
    res, res_explicit = run_clis([*default_args(inp, out), "--workers", 3],
                                 ["run", inp, "-o", explicit, "--max-new-tokens", 4, "--ignore-eos",
                                  "--unit-rows", 25, "--progress", "none"])
    assert res.returncode == 0, res.stderr
    r = read_report(out)
    assert (r["unit_rows"], r["unit_rows_source"], r["units_resumed"]) == (10, "resumed", 3)
    assert r["rows_this_run"] == sum(e["rows"] for e in lost) and sorted(manifest_units(out)) == \
        sorted(e["unit"] for e in entries)
    assert outputs(out) == want and (out / "_SUCCESS").exists()
    assert res_explicit.returncode == 0, res_explicit.stderr
    r = read_report(explicit)
    assert (r["units"], r["unit_rows"], r["unit_rows_source"]) == (3, 25, "option")


# --- rebalancing ----------------------------------------------------------------------------------

def test_rebalancing_moves_workers_and_outputs_stay_identical(sixty, default_run):
    """Defaults (1 prefill + 1 decode worker to start, rebalancing on): the decode worker
    prefills while units wait for prefill, the prefill worker decodes the units it holds once
    nothing is left to prefill; every row still equals HF generate token for token, and each
    row records who did which phase."""
    out = default_run[0]
    assert outputs(out) == sixty[1]
    r = read_report(out)
    roles, switches = r["roles"], r["role_switches"]
    assert roles["rebalance"] is True and roles["initial"] == {"decode-0": "decode", "prefill-0": "prefill"}
    assert roles["switches"] == len(switches) > 0
    moves = {(s["worker"], s["from"], s["to"]) for s in switches}
    assert ("decode-0", "decode", "prefill") in moves and ("prefill-0", "prefill", "decode") in moves, switches
    assert all(s["reason"] and s["t_s"] >= 0 for s in switches)
    assert [s["t_s"] for s in switches] == sorted(s["t_s"] for s in switches)
    # both phases happened on both workers, and the rows say so
    assert set(r["rows_by_prefill_worker"]) == set(r["rows_by_decode_worker"]) == {"prefill-0", "decode-0"}
    rows = read_rows(out)
    assert {(x["prefill_worker"], x["decode_worker"]) for x in rows} >= {("prefill-0", "prefill-0"),
                                                                          ("decode-0", "decode-0")}
    assert r["workers"] == {"prefill": 1, "decode": 1}  # the split the workers started with


def test_fixed_split_without_rebalancing_never_switches(sixty, tmp_path):
    """--prefill-workers/--decode-workers with rebalancing off (here from a job file's
    `rebalance = false`) is exactly that split: no switch, every row prefilled on a prefill
    worker and decoded on a decode worker, KV moved for every row."""
    job = tmp_path / "job.toml"
    job.write_text("rebalance = false\nprefill_workers = 1\ndecode_workers = 1\n")
    out = tmp_path / "out"
    res = run_cli("run", sixty[0] / "in.parquet", "-o", out, "--config", job, "--max-new-tokens", NEW,
                  "--ignore-eos", "--progress", "none")
    assert res.returncode == 0, res.stderr
    assert outputs(out) == sixty[1]
    r = read_report(out)
    assert r["roles"]["rebalance"] is False and r["roles"]["switches"] == 0 and r["role_switches"] == []
    assert r["roles"]["final"] == r["roles"]["initial"] == {"decode-0": "decode", "prefill-0": "prefill"}
    assert r["rows_by_prefill_worker"] == {"prefill-0": 60} and r["rows_by_decode_worker"] == {"decode-0": 60}
    assert r["kv_bytes_moved"] > 0


def test_fixed_split_paces_prefill_to_the_decode_slots(sixty, tmp_path):
    """With 4 decode slots and units of 4 rows, the second unit cannot have a slot while the
    first prefills: it waits before its prefill (pacing.py), and every row is still exact."""
    out = tmp_path / "out"
    res = run_cli("run", sixty[0] / "in.parquet", "-o", out, "--max-new-tokens", NEW, "--ignore-eos",
                  "--progress", "none", "--no-rebalance", "--max-num-seqs", 4, "--unit-rows", 4)
    assert res.returncode == 0, res.stderr
    assert outputs(out) == sixty[1]
    r = read_report(out)
    assert r["units"] == 15 and 1 <= r["units_paced"] < 15, r["units_paced"]
    assert r["rows_by_decode_worker"] == {"decode-0": 60}


def test_pacing_rule():
    slots = DecodeSlots
    # occupied: the heartbeat's rows plus what it cannot have seen yet, never above what was routed
    assert slots(10, 0, None).occupied() == 10
    assert slots(10, 4, 3).occupied() == 7
    assert slots(10, 4, 9).occupied() == 10
    assert slots(0, 0, 5).occupied() == 0  # a stale heartbeat of rows already written
    # no decoder yet: prefill runs ahead, its KV waits on the prefill worker
    assert may_prefill(8, [], committed_rows=100, max_num_seqs=4)
    # slots free for the unit after the rows already on their way
    assert may_prefill(4, [slots(0, 0, 0)], committed_rows=4, max_num_seqs=8)
    assert not may_prefill(4, [slots(0, 0, 0)], committed_rows=5, max_num_seqs=8)
    assert not may_prefill(4, [slots(6, 0, 6)], committed_rows=0, max_num_seqs=8)
    assert may_prefill(4, [slots(6, 0, 6), slots(2, 0, 2)], committed_rows=0, max_num_seqs=8)
    # a unit larger than every slot together goes once they are all free: the job always moves
    assert may_prefill(100, [slots(0, 0, 0), slots(0, 0, None)], committed_rows=0, max_num_seqs=8)
    assert not may_prefill(100, [slots(1, 0, 1), slots(0, 0, 0)], committed_rows=0, max_num_seqs=8)
    # slots that free while the unit prefills count: rows written per second x a unit's prefill time
    assert may_prefill(4, [slots(8, 0, 8)], committed_rows=0, max_num_seqs=8, freed_soon=4)
    assert not may_prefill(4, [slots(8, 0, 8)], committed_rows=0, max_num_seqs=8, freed_soon=3)
    rate = DecodeRate(window_s=30.0)
    assert rate.freed_during_prefill(0.0) == 0  # nothing measured yet: no slot is counted
    rate.unit_written(8, now=100.0)
    rate.unit_prefilled(2.0)
    assert rate.freed_during_prefill(101.0) == 0  # one unit marks the window's start only
    rate.unit_written(8, now=104.0)
    rate.unit_written(8, now=108.0)
    assert rate.freed_during_prefill(108.0) == 4  # 16 rows in 8 s, for 2 s of prefill
    rate.unit_prefilled(7.0)  # a moving average: 0.8 x 2 + 0.2 x 7 = 3 s
    assert rate.freed_during_prefill(108.0) == 6
    assert rate.freed_during_prefill(200.0) == 0  # the window moved past every unit


# --- the rules on their own -------------------------------------------------------------------------

def _roles(rebalance=True) -> tuple[Roles, set]:
    roles = Roles(rebalance=rebalance, started=0.0)
    roles.sync({"p": {"name": "prefill-0", "resources": {"prefill": 1}},
                "d": {"name": "decode-0", "resources": {"decode": 1}},
                "x": {"name": "plain", "resources": {}}})
    return roles, {"p", "d", "x"}


def test_roles_follow_the_queues():
    roles, live = _roles()
    assert roles.role == {"p": "prefill", "d": "decode", "x": "decode"}  # no role resource: the rarer role
    full = {"p": PREFILL_DEPTH}
    # units wait for prefill, the prefill worker is full, decode has nothing waiting: the drained
    # decode workers prefill (as many as the queue needs)
    roles.rebalance_tick(View(full, {"x": 4}, {}, queued_prefill=2, waiting_decode=0), live, now=1.0)
    assert roles.role == {"p": "prefill", "d": "prefill", "x": "decode"}
    # nothing left to prefill and prefilled units wait: idle prefill workers decode, KV holders first
    roles.rebalance_tick(View({"p": 0, "d": 0}, {"x": 4}, {"d": 1}, queued_prefill=0, waiting_decode=1), live, 2.0)
    assert roles.role == {"p": "prefill", "d": "decode", "x": "decode"}
    # prefill work remains, but a prefilled unit has waited past the patience (a tenth of the
    # default unit decode time, 2 s): its holder decodes
    roles.switch("d", "prefill", "test", now=2.5)
    roles.rebalance_tick(View({"p": 2, "d": 1}, {"x": 4}, {"p": 1}, 3, 1, oldest_wait_s=0.1), live, 2.6)
    assert roles.role["p"] == "prefill"
    roles.rebalance_tick(View({"p": 2, "d": 1}, {"x": 4}, {"p": 1}, 3, 1, oldest_wait_s=0.3), live, 2.7)
    assert roles.role == {"p": "decode", "d": "prefill", "x": "decode"}
    roles.switch("p", "prefill", "test", now=2.8)
    roles.switch("d", "decode", "test", now=2.9)
    # a prefill worker with room: nothing moves
    roles.rebalance_tick(View({"p": 1}, {"d": 8, "x": 8}, {}, queued_prefill=1, waiting_decode=0), live, 3.0)
    assert roles.switch_count == 6
    # no worker prefills, every decoder busy: the least-loaded one switches after the patience
    roles.switch("p", "decode", "test", now=4.0)
    roles.unit_decoded(4.0)  # patience: a quarter of a unit's decode time
    view = View({}, {"p": 8, "d": 2, "x": 8}, {}, queued_prefill=1, waiting_decode=0)
    roles.rebalance_tick(view, live, 5.0)
    roles.rebalance_tick(view, live, 5.5)
    assert roles.role["d"] == "decode"
    roles.rebalance_tick(view, live, 6.1)
    assert roles.role["d"] == "prefill"
    assert [s["t_s"] for s in roles.switches] == [1.0, 2.0, 2.5, 2.7, 2.8, 2.9, 4.0, 6.1]
    assert roles.report()["final"] == {"decode-0": "prefill", "plain": "decode", "prefill-0": "decode"}


def test_before_any_unit_decoded_the_patience_follows_the_rows_output_length():
    """Until a unit was decoded, a unit's decode time is its longest row's max_new_tokens decode
    steps (PRIOR_STEP_S each): with long outputs both workers go on prefilling through a short
    wait for a decoder (the units will decode for long; a switch would halve prefill for a
    TPOT gain of a few percent), with short ones a decoder starts at once; once a unit was
    decoded, its measured time decides."""
    def switched(unit_tokens: int, waited: float, measured: float | None = None) -> bool:
        roles, live = _roles()
        roles.switch("d", "prefill", "test", now=0.0)  # p and d prefill
        if measured is not None:
            roles.unit_decoded(measured)
        view = View({"p": 2, "d": 1}, {"x": 4}, {"p": 1}, queued_prefill=3, waiting_decode=1,
                    oldest_wait_s=waited, unit_tokens=unit_tokens)
        roles.rebalance_tick(view, live, 1.0)
        return roles.role["p"] == "decode"

    assert roles_mod.PRIOR_STEP_S * 256 == pytest.approx(10.24)
    assert not switched(256, waited=0.5) and switched(256, waited=1.1)  # patience 1.02 s
    assert switched(32, waited=0.2)  # patience 0.13 s
    assert not switched(0, waited=0.15) and switched(0, waited=0.25)  # lengths unknown: 2 s a unit
    assert switched(256, waited=0.2, measured=1.0)  # measured: a unit decodes in 1 s


def test_someone_prefills_while_units_wait_for_prefill():
    """Seen on the decode-heavy bench workload: every worker decoding its share, prefilled units
    waiting for a decoder and units waiting for prefill; nobody prefilled until decode drained.
    Now the last prefill worker stays, and with none left one decoder switches back."""
    roles = Roles(rebalance=True, started=0.0)
    roles.sync({"p": {"name": "prefill-0", "resources": {"prefill": 1}},
                "d": {"name": "decode-0", "resources": {"decode": 1}}})
    live = {"p", "d"}
    busy = View({"p": 1}, {"d": 8}, {"p": 1}, queued_prefill=3, waiting_decode=1, oldest_wait_s=5.0)
    roles.rebalance_tick(busy, live, now=1.0)
    assert roles.role == {"p": "prefill", "d": "decode"}  # the only prefill worker keeps prefilling
    # both decode (the queue had emptied meanwhile), then units queue again behind busy decoders
    roles.switch("p", "decode", "test", now=2.0)
    stuck = View({}, {"p": 4, "d": 8}, {"p": 1}, queued_prefill=3, waiting_decode=1, oldest_wait_s=5.0)
    roles.rebalance_tick(stuck, live, now=2.1)
    assert roles.role == {"p": "decode", "d": "decode"}  # the patience: half a second by default
    roles.rebalance_tick(stuck, live, now=2.7)
    assert roles.role == {"p": "prefill", "d": "decode"}  # the least-loaded decoder prefills
    roles.rebalance_tick(View({"p": 2}, {"p": 4, "d": 8}, {"p": 1}, 1, 1, oldest_wait_s=9.0), live, now=3.0)
    assert roles.role == {"p": "prefill", "d": "decode"} and roles.switch_count == 2
    # a drained decoder switches at once
    roles.switch("p", "decode", "test", now=4.0)
    roles.rebalance_tick(View({}, {"p": 4}, {"p": 1}, 2, 1, oldest_wait_s=1.0), live, now=4.05)
    assert roles.role == {"p": "decode", "d": "prefill"}


def test_a_decoder_that_prefills_at_low_priority_is_lent_one_unit_when_prefill_is_full():
    roles, live = _roles()  # p prefills; d and x decode
    able = {"d"}  # x's engine would slow its decode if it prefilled (a GPU, or vLLM)
    assert roles.prefill_helpers({"p": 1}, able, live) == []  # a prefill worker has room
    assert roles.prefill_helpers({"p": PREFILL_DEPTH}, able, live) == ["d"]
    assert roles.prefill_helpers({"p": PREFILL_DEPTH, "d": 1}, able, live) == []  # one unit at a time
    assert roles.prefill_helpers({"p": PREFILL_DEPTH}, able, {"p", "x"}) == []  # d left
    assert roles.role == {"p": "prefill", "d": "decode", "x": "decode"} and roles.switch_count == 0


def test_without_rebalancing_roles_never_move():
    roles, live = _roles(rebalance=False)
    assert roles.role == {"p": "prefill", "d": "decode"}  # a worker without a role resource takes no work
    for view in (View({"p": PREFILL_DEPTH}, {}, {}, 5, 0), View({"p": 0}, {"d": 4}, {"p": 3}, 0, 3)):
        roles.rebalance_tick(view, live, 1.0)
    assert roles.switch_count == 0 and roles.switches == []


def test_dashboard_roles_view_and_monitor_counts():
    """The page's roles text (current roles, every recent switch) and the monitor's per-role
    worker counts come from the driver's roles, not from the engines (which all do both)."""
    job = {"job": "j", "roles": {"prefill-0": "decode", "decode-0": "decode"}, "role_switches": 1,
           "rebalance": True, "unit_rows": 8,
           "recent_switches": [{"t_s": 3.2, "worker": "prefill-0", "from": "prefill", "to": "decode",
                                "reason": "nothing to prefill, prefilled units wait for a decoder"}]}
    html = roles_html(job)
    assert "rebalancing on, 1 switches" in html and "<b>decode</b> (2): decode-0, prefill-0" in html
    assert "prefill-0" in html and "prefill &rarr; decode" in html and "3.2 s" in html
    assert "fixed split" in roles_html({**job, "rebalance": False})

    class WS:
        def __init__(self, name, tokens):
            self.name, self.resources = name, {}
            self.metrics = {"pdbatch": {"roles": ["decode", "prefill"], "prefill_tokens": tokens,
                                        "decode_tokens": 5, "kv_held_bytes": 100}}

    class Sched:
        workers = {"a": WS("prefill-0", 30), "b": WS("decode-0", 12)}

    mon = Monitor()
    mon.scheduler = Sched()
    mon.receive(job)
    roles = mon.roles()
    assert (roles["prefill"]["workers"], roles["decode"]["workers"]) == (0, 2)
    assert roles["prefill"]["prefill_tokens"] == 42 and roles["decode"]["decode_tokens"] == 10
    assert roles["decode"]["kv_held_bytes"] == 200 and "kv_held_bytes" not in roles["prefill"]
    point = mon.sample()
    assert (point["prefill_workers"], point["decode_workers"], point["role_switches"]) == (0, 2, 1)


def _routing_pipeline(rows_a_unit: int):
    """A Pipeline with only what decode routing reads (p: prefill-0, d: decode-0, both live), and
    a maker of its units."""
    from types import SimpleNamespace

    from pdbatch.driver.pipeline import Pipeline, _Unit

    def unit(name, work, phase, decoder=None, prefill="p"):
        return _Unit(unit=SimpleNamespace(unit_id=name), keep=None, rows=pa.table({"x": [0] * rows_a_unit}),
                     phase=phase, work=work, decode_worker=decoder, prefill_worker=prefill)

    pipe = Pipeline.__new__(Pipeline)
    pipe.cfg = SimpleNamespace(max_num_seqs=64)
    pipe.workers = {"p": {"status": "running"}, "d": {"status": "running"}}
    pipe.names = {"p": "prefill-0", "d": "decode-0"}
    pipe.budgets, pipe.decode_kv = {"p": 1 << 30, "d": 1 << 30}, {}
    pipe.decode_progress = DecodeProgress()
    pipe.roles, pipe.prefill_load = Roles(rebalance=True), {}
    pipe.roles.sync({"p": {"name": "prefill-0", "resources": {"prefill": 1}},
                     "d": {"name": "decode-0", "resources": {"decode": 1}}})
    return pipe, unit


def test_the_last_prefilled_unit_finds_a_decoder_when_every_worker_decodes():
    """Seen on the decode-heavy bench workload (8 units of 4 rows, output lengths differ): both
    workers decoding, one prefilled unit left; it fitted no one's fair share of the decode
    tokens once added, waited 31 s for a unit to finish, then decoded alone for 28 s. A worker
    below its share before the unit takes it."""
    pipe, unit = _routing_pipeline(4)
    pipe.roles.role = {"p": "decode", "d": "decode"}  # both workers decode
    last = unit("u7", 900, "wait-room")
    pipe.inflight = {"u0": unit("u0", 1000, "decode", "p"), "u1": unit("u1", 1000, "decode", "p"),
                     "u2": unit("u2", 700, "decode", "d"), "u3": unit("u3", 800, "decode", "d"), "u7": last}
    # stage 4400 tokens over 2 workers: a share of 2200; p holds 2000, d 1500, and either plus
    # 900 is over it. Its own prefill worker takes it (its KV is there)
    assert pipe._pick_decoder(last, ["p", "d"]) == "p"
    last.prefill_worker = "gone"  # else the least-loaded one below its share
    assert pipe._pick_decoder(last, ["p", "d"]) == "d"
    # a third worker, prefilling now, could change role: the shares are thirds, both are above
    pipe.workers["x"] = {"status": "running"}
    assert pipe._pick_decoder(last, ["p", "d"]) is None
    # p has generated 1200 of its 2000 tokens (its heartbeat): 800 left, the least of the
    # workers, and below a third of what is left (800 + 1500 + 900)
    pipe.decode_progress.heartbeat("p", 0)
    pipe.decode_progress.heartbeat("p", 1200)
    assert pipe._pick_decoder(last, ["p", "d"]) == "p"


def test_a_unit_waits_for_its_holder_when_the_holder_decodes_next():
    """Seen at 60 rows: the two workers ran out of prefill 50 ms apart; the first to decode took
    the other's prefilled units, the other then took the first's, and 69 % of the job's KV
    crossed between them. A unit whose holder is running its last prefill (nothing waits to be
    prefilled) now stays for it, unless a decoder has nothing at all to decode."""
    pipe, unit = _routing_pipeline(10)
    pipe.prefill_load = {"p": 1}  # p runs its last prefill
    held = unit("u1", 1000, "wait-room")
    pipe.inflight = {"u0": unit("u0", 1000, "decode", "d", prefill="d"), "u1": held,
                     "u2": unit("u2", 1000, "wait-room"), "u3": unit("u3", 1000, "prefill")}
    # d is below its share (1000 of 3000 / 2), but p decodes its own units next
    assert pipe._pick_decoder(held, ["d"]) is None
    pipe.inflight["u4"] = unit("u4", 1000, "queued")  # p has more to prefill: d takes the unit
    assert pipe._pick_decoder(held, ["d"]) == "d"
    del pipe.inflight["u4"]
    pipe.prefill_load["p"] = 2  # two units to prefill: not soon
    assert pipe._pick_decoder(held, ["d"]) == "d"
    pipe.prefill_load["p"] = 1
    del pipe.inflight["u0"]  # a decoder with nothing to decode takes it at once
    assert pipe._pick_decoder(held, ["d"]) == "d"
    pipe.roles.rebalance = False  # a fixed split: the holder never decodes
    pipe.inflight["u0"] = unit("u0", 1000, "decode", "d", prefill="d")
    assert pipe._pick_decoder(held, ["d"]) == "d"


def test_a_lone_decoder_takes_every_prefilled_unit_while_units_wait_for_prefill():
    """Seen on `summarize` (prefill-heavy): one decoder, one prefill worker with units still to
    prefill. The decoder's fair share counted the prefill worker too, so half the prefilled
    units waited on the driver with their first token out (short rows: TPOT 0.3 s). While units
    wait for prefill the prefill workers go on prefilling: the decoders share the work alone."""
    pipe, unit = _routing_pipeline(5)
    pipe.roles.role = {"p": "prefill", "d": "decode"}
    nxt = unit("u1", 300, "wait-room")
    pipe.inflight = {"u0": unit("u0", 300, "decode", "d", prefill="d"), "u1": nxt,
                     "u2": unit("u2", 300, "prefill"), "u3": unit("u3", 300, "queued")}
    # stage 600 over the one decoder: d (300 left) is below it
    assert pipe._pick_decoder(nxt, ["d"]) == "d"
    # nothing left to prefill but the unit p runs: p decodes soon, the share is half (300) and
    # d, with 300 left, is at it
    pipe.inflight["u3"].phase = "prefill"
    pipe.prefill_load = {"p": 2}
    assert pipe._pick_decoder(nxt, ["d"]) is None


def test_decode_work_left_counts_what_a_worker_already_generated():
    """Fair shares count the decode work a worker has left (decode_progress.py): routed and not
    yet written, less the tokens its engine generated for those units."""
    p = DecodeProgress()
    p.heartbeat("a", 500)  # an engine that served an earlier job: counted from the first beat
    assert p.left("a", 1000) == 1000
    p.heartbeat("a", 900)
    assert p.left("a", 1000) == 600
    # a unit of 4 rows (work 120) is written with 100 tokens, 96 of them from decode steps (each
    # row's first came from prefill); 880 routed work stays open, 304 of it generated
    p.unit_written("a", {"rows": 4, "errors": 0, "output_tokens": 100})
    assert p.left("a", 880) == 576
    # the heartbeat lags the write: never less progress than none, never less work than none
    p.unit_written("a", {"rows": 2, "errors": 1, "output_tokens": 400})
    assert p.left("a", 700) == 700 and p.left("a", 0) == 0
    p.heartbeat("b", 10**6)
    assert p.left("b", 50) == 50 and p.left("never-seen", 50) == 50


def _ran_at() -> float:
    return time.time()


def test_a_decode_runs_before_the_prefill_queued_behind_the_running_one():
    """A worker running one prefill with a second one queued (a decoder lent to prefill, called
    back to decode) runs a decode task handed to it next, not after both prefills: its rows
    already have their first token out. A real Dask worker with one thread, the driver's
    submit_on."""
    from distributed import Client, Event, LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        worker = cluster.workers[0]
        gate = Event("gate", client=client)

        running = submit_on(client, worker.address, "prefill", "prefill-running", hold_thread, "gate")
        queued = submit_on(client, worker.address, "prefill", "prefill-queued", _ran_at)
        wait_task_states(worker, **{"prefill-running": "executing", "prefill-queued": "ready"})
        # later than the scheduler's fifo-timeout (60 ms), as a decode comes seconds after the
        # prefills in a job: Dask then runs tasks of equal priority in the order they came
        time.sleep(0.2)
        decode = submit_on(client, worker.address, "decode", "decode-0", _ran_at)
        wait_task_states(worker, **{"decode-0": "ready"})
        gate.set()
        assert running.result() <= decode.result() < queued.result()
