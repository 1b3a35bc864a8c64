"""Issue 16: every decoder-only family the built-in engine accepts gives greedy output
token-identical to Hugging Face `generate` one prompt at a time (both modes, prompt + output
longer than every sliding window); what it cannot run exactly is refused in one line, exit 2;
a unit whose result cannot be serialized is retried, quarantined, and the job ends by itself."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_models import hf_greedy, longrope_model, random_prompts
from model_families import FAMILIES
from pipeline_helpers import read_report, read_rows, run_cli, run_clis

from pdbatch.driver.faults import ENV_UNSERIALIZABLE
from pdbatch.engines.builtin.decode import generate
from pdbatch.engines.builtin.model import load_model
from pdbatch.engines.request import Request
from pdbatch.engines.sampling import SamplingParams
from pdbatch.errors import UserError
from pdbatch.toymodels import build_family

NEW = 32  # generated tokens: with 20-60-token prompts, every row runs past the 16-20-token windows


@pytest.fixture(scope="module")
def family_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    built = {}

    def get(name: str) -> str:
        if name not in built:
            model_type, kwargs, _ = FAMILIES[name]
            built[name] = str(build_family(root / name, model_type, seed=0, **kwargs))
        return built[name]
    return get


def _requests(prompts):
    return [Request(f"r{i}", p, SamplingParams(max_new_tokens=NEW, ignore_eos=True)) for i, p in enumerate(prompts)]


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_matches_hf_both_modes(family_dir, name):
    torch.set_num_threads(1)
    lm = load_model(family_dir(name), dtype="float32", device="cpu")
    prompts = random_prompts(6, 4000, seed=1, min_len=20, max_len=60)
    ref = [hf_greedy(lm, p, NEW) for p in prompts]
    for colocated in (True, False):
        # a small pass budget: several prefill batches, rows of different lengths in one decode batch
        outs = generate(lm, _requests(prompts), colocated=colocated, max_batch_tokens=200)
        assert [o.error for o in outs] == [None] * len(prompts)
        assert [o.output_token_ids for o in outs] == ref, (name, "colocated" if colocated else "disaggregated")


def test_sliding_window_packets_carry_full_kv(family_dir):
    """A Mistral-style window smaller than the prompt: the packet still holds every prompt token
    (decode masks the window itself) and round-trips through Dask's serializers."""
    from distributed.protocol import deserialize, serialize

    from pdbatch.engines.builtin.prefill import PrefillEngine
    from pdbatch.kv.packet import UnitPackets

    lm = load_model(family_dir("mistral"), dtype="float32", device="cpu")
    prompts = random_prompts(3, 4000, seed=2, min_len=40, max_len=60)
    packets = PrefillEngine(lm, 200).run(_requests(prompts))
    assert [p.length for p in packets] == [len(p) for p in prompts]
    back = deserialize(*serialize(UnitPackets(packets), serializers=("dask", "pickle"), on_error="raise"))
    assert all(torch.equal(a.kv, b.kv) for a, b in zip(packets, back))


def test_unsupported_model_is_refused_in_one_line(tmp_path):
    model = longrope_model(tmp_path / "longrope")
    with pytest.raises(UserError, match="--max-model-len 64"):
        load_model(model, dtype="float32", device="cpu")
    load_model(model, dtype="float32", device="cpu", max_model_len=64)  # below the switch: exact, accepted
    inp = tmp_path / "in.parquet"
    pq.write_table(pa.table({"prompt": ["hello there"]}), inp)
    res = run_cli("run", inp, "-o", tmp_path / "out", "--model", model, timeout=120)
    assert res.returncode == 2, res.stderr
    lines = [line for line in res.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot run" in lines[0] and "--engine vllm" in lines[0], res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "out" / "_pdbatch" / "report.json").exists()


def _prompt_table(lm, n: int, seed: int):
    prompts = random_prompts(n, 4000, seed=seed, min_len=20, max_len=50)
    texts = [lm.tokenizer.decode(p) for p in prompts]
    ids = [lm.tokenizer(t)["input_ids"] for t in texts]  # what the job will tokenize
    return pa.table({"id": [f"row{i}" for i in range(n)], "prompt": texts}), ids


# two through the CLI (each costs a cluster start); every family runs both modes in-process above
CLI_FAMILIES = {"mistral": "disaggregated", "gemma2": "colocated"}


@pytest.fixture(scope="module")
def cli_jobs(family_dir, tmp_path_factory):
    """This file's CLI jobs side by side: CLI_FAMILIES', and test_unserializable_...'s (its own
    environment injects the fault). {name: (lm, prompt ids, output dir, result)}"""
    tmp = tmp_path_factory.mktemp("family-jobs")
    jobs, envs = {}, []
    for name, mode in CLI_FAMILIES.items():
        model = family_dir(name)
        lm = load_model(model, dtype="float32", device="cpu")
        table, ids = _prompt_table(lm, 6, seed=3)
        pq.write_table(table, tmp / f"{name}.parquet")
        jobs[name] = (lm, ids, ["run", tmp / f"{name}.parquet", "-o", tmp / name, "--model", model,
                                "--id-column", "id", "--mode", mode, "--max-new-tokens", NEW, "--ignore-eos",
                                "--unit-rows", 3])
        envs.append(None)
    model, lm = family_dir("mistral"), jobs["mistral"][0]
    table, ids = _prompt_table(lm, 6, seed=4)
    pq.write_table(table, tmp / "unserializable.parquet")
    jobs["unserializable"] = (lm, ids, ["run", tmp / "unserializable.parquet", "-o", tmp / "unserializable",
                                        "--model", model, "--id-column", "id", "--max-new-tokens", 8, "--ignore-eos",
                                        "--unit-rows", 3, "--max-attempts", 2])
    envs.append({ENV_UNSERIALIZABLE: "row4"})
    results = run_clis(*(args for _, _, args in jobs.values()), timeout=400, envs=envs)
    return {name: (lm, ids, tmp / name, res) for (name, (lm, ids, _)), res in zip(jobs.items(), results)}


def test_cli_families_match_hf(cli_jobs):
    """Through the real CLI on a local cluster: KV packets of sliding-window models travel."""
    for name in CLI_FAMILIES:
        lm, ids, out, res = cli_jobs[name]
        assert res.returncode == 0, (name, res.stderr)
        rows = read_rows(out)
        assert [r["error"] for r in rows] == [None] * len(ids), name
        assert [r["output_token_ids"] for r in rows] == [hf_greedy(lm, p, NEW) for p in ids], name


def test_unserializable_result_is_retried_then_quarantined(cli_jobs):
    """A prefill result that cannot be serialized fails its unit's attempt (retried), then the
    unit's rows are probed alone and the one bad row is quarantined with the error in the row and
    in report.json; the job ends by itself with every other row written."""
    lm, ids, out, res = cli_jobs["unserializable"]
    assert res.returncode == 0, res.stderr
    rows = {r["id"]: r for r in read_rows(out)}
    assert set(rows) == {f"row{i}" for i in range(6)}
    assert "quarantined" in rows["row4"]["error"] and "cannot be serialized" in rows["row4"]["error"]
    for i, p in enumerate(ids):
        if i != 4:
            assert rows[f"row{i}"]["error"] is None
            assert rows[f"row{i}"]["output_token_ids"] == hf_greedy(lm, p, 8)
    report = read_report(out)
    assert report["rows_quarantined"] == 1 and report["unit_retries"] >= 2
    assert any("cannot be serialized" in f["error"] and "injected fault" in f["error"]
               for f in report["unit_failures"])
    assert "cannot be serialized" in res.stderr


def test_watchdog_bound_and_diagnosis():
    """The bound follows observed progress (floor 180 s, 10 x the longest quiet gap) unless
    --stall-timeout fixes it; a stuck unit comes back with its tasks' states and worker errors."""
    import time
    from types import SimpleNamespace

    from pdbatch.driver import watchdog as wd

    class FakeClient:
        def run(self, fn, on_error=None):
            return {"w1": {"prefill_tokens": 5, "decode_tokens": 0}}  # nothing moves

        def run_on_scheduler(self, fn, keys):
            return {k: {"state": "processing", "worker": "w1"} for k in keys}

        def get_worker_logs(self, n, workers):
            return {"w1": [("ERROR", "failed during get data: TypeError: cannot serialize")]}

    dog = wd.Watchdog(FakeClient())
    assert dog.bound() == wd.MIN_BOUND_S
    dog.longest_gap = 60.0
    assert dog.bound() == 600.0
    dog = wd.Watchdog(FakeClient(), fixed_bound_s=0.01)
    fut = SimpleNamespace(key="decode-u0-x-0", done=lambda: False)
    unit = SimpleNamespace(unit=SimpleNamespace(unit_id="u0"), futures={"decode": fut},
                           prefill_worker="w0", decode_worker="w1")
    assert dog.check({}) == []
    dog.last = time.time() - wd.POLL_AFTER_S - 1
    (got, why), = dog.check({"u0": unit})
    assert got is unit and "decode-u0-x-0: processing on w1" in why and "cannot serialize" in why
