"""Hostile input corpus (issue 6): each bad input is a test case with its expected outcome.

- Job-level problems (the input, the job file, the model or an option is unusable as a whole):
  exit code 2 and exactly one line, before any worker starts. These run `pdbatch.cli.main`
  in-process (same code path as the command, without 2 s of interpreter start-up per case);
  starting a cluster there is a test failure.
- Row-level problems: that row's `error` is set and every other row is correct. The rows are
  batched into two real CLI runs on a local cluster (a binary prompt column with per-row
  sampling columns, and a JSON `messages` column); each row is its own test case.

Decisions recorded here (and in the README):
- A zero-row input is not an error: exit 0, an empty dataset with the output schema, _SUCCESS.
- Duplicate ids are the user's ids, not keys: each input row still gets exactly one output row,
  so the output has the same duplicates as the input (resume works by row position, not id).
- A NaN in a sampling column means "not set" (as pandas' missing value), like a null.
- A temperature below 1e-5 is greedy (vLLM's epsilon): dividing logits by 1e-300 would overflow.
- max_new_tokens beyond the context window is clamped to it (finish_reason "length"), as vLLM.
"""

from __future__ import annotations

import json
import math
import shutil

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from fixtures_models import hf_greedy
from pipeline_helpers import DEFAULT_MODEL, read_report, read_rows, run_clis

from pdbatch.cli import main
from pdbatch.engines.builtin.model import load_model


def _table(path, **cols):
    pq.write_table(pa.table(cols), path)
    return path


def _ok(d):
    return _table(d / "ok.parquet", prompt=["Hello there."])


def _job_file(d, text):
    (d / "job.toml").write_text(text)
    return ["--config", d / "job.toml"]


def _truncated(d):
    p = _table(d / "t.parquet", prompt=[f"row {i}" for i in range(500)])
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    return [p]


def _mixed_dir(d, second):
    (d / "in").mkdir()
    _table(d / "in" / "a.parquet", prompt=["a", "b"])
    second(d / "in")
    return [d / "in"]


def _model_copy(d, drop=(), config=None):
    m = d / "model"
    shutil.copytree(DEFAULT_MODEL, m)
    for name in drop:
        (m / name).unlink()
    if config is not None:
        (m / "config.json").write_text(config)
    return ["--model", m]


# (case, builder(tmp) -> args after `run INPUT -o OUT` (a leading path replaces INPUT), expected)
JOB_LEVEL = [
    ("int prompt column", lambda d: [_table(d / "i.parquet", prompt=[1, 2, 3])], "prompt column 'prompt' is int64"),
    ("list<string> prompt column", lambda d: [_table(d / "l.parquet", prompt=[["a"], ["b"]])],
     "must hold text (string or binary) or token ids"),
    ("messages column of numbers", lambda d: [_table(d / "m.parquet", messages=[1.5, 2.5])],
     "messages column 'messages' is double"),
    ("prompt type differs between shards",
     lambda d: _mixed_dir(d, lambda p: _table(p / "b.parquet", prompt=[1, 2])), "schema differs between input files"),
    ("prompt column missing in one shard",
     lambda d: _mixed_dir(d, lambda p: _table(p / "b.parquet", text=["x"])), "column 'prompt' missing in"),
    ("truncated Parquet file", _truncated, "not a readable Parquet file"),
    ("empty (0-byte) .parquet file", lambda d: [(d / "e.parquet").write_bytes(b"") or d / "e.parquet"],
     "not a readable Parquet file"),
    ("directory with a non-Parquet file",
     lambda d: _mixed_dir(d, lambda p: (p / "notes.txt").write_text("not parquet")), "give a glob such as"),
    ("directory with only hidden/_ files",
     lambda d: [(d / "h").mkdir() or (d / "h" / "_SUCCESS").write_text("") or d / "h"],
     "no Parquet files in directory"),
    ("job file with an unknown key", lambda d: [_ok(d), *_job_file(d, "max_new_token = 5\n")],
     "unknown key 'max_new_token'"),
    ("job file that is not TOML", lambda d: [_ok(d), *_job_file(d, "max_new_tokens = = 5\n")], "is not valid TOML"),
    ("job file value of the wrong type", lambda d: [_ok(d), *_job_file(d, 'max_new_tokens = "many"\n')],
     "option max_new_tokens must be int"),
    ("job file [tls] with an unknown key", lambda d: [_ok(d), *_job_file(d, '[tls]\ncafile = "ca.pem"\n')],
     "unknown key 'cafile' in [tls]"),
    ("model directory without weights", lambda d: [_ok(d), *_model_copy(d, drop=["model.safetensors"])],
     "has no weight files"),
    ("model config.json that is not JSON", lambda d: [_ok(d), *_model_copy(d, config="{oops")],
     "config.json is not a JSON object"),
    ("--max-new-tokens 0", lambda d: [_ok(d), "--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    ("--top-p 1.5", lambda d: [_ok(d), "--top-p", "1.5"], "top_p must be in (0, 1]"),
    ("--temperature nan", lambda d: [_ok(d), "--temperature", "nan"], "temperature must be a finite number"),
    ("--worker-timeout -1", lambda d: [_ok(d), "--worker-timeout", "-1"], "--worker-timeout must be > 0"),
    ("--kv-budget lots", lambda d: [_ok(d), "--kv-budget", "lots"], "cannot read size 'lots'"),
    ("TLS certificate files missing", lambda d: [_ok(d), "--tls-ca-file", d / "ca.pem", "--tls-cert", d / "c.pem",
                                                 "--tls-key", d / "k.pem"], "TLS file not found"),
    ("TLS over UCX", lambda d: [_ok(d), "--tls", "auto", "--protocol", "ucxx"], "TLS cannot protect UCX"),
]


@pytest.fixture
def no_cluster(monkeypatch):
    def refuse(cfg):
        raise AssertionError("a job-level problem must be caught before any cluster starts")

    monkeypatch.setattr("pdbatch.driver.cluster.connect", refuse)


@pytest.mark.parametrize("build,needle", [c[1:] for c in JOB_LEVEL], ids=[c[0] for c in JOB_LEVEL])
def test_job_level_exit_2_one_line(build, needle, tmp_path, capsys, no_cluster):
    args = [str(a) for a in build(tmp_path)]
    with pytest.raises(SystemExit) as exit_:
        main(["run", args[0], "-o", str(tmp_path / "out"), *args[1:]])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2, err
    assert len(err) == 1 and err[0].startswith("pdbatch: error: ") and needle in err[0], err
    assert not (tmp_path / "out" / "_SUCCESS").exists()


def test_zero_row_file_gives_empty_dataset(tmp_path, capsys, no_cluster):
    """Not an error: nothing to generate, so no cluster starts; readers see the columns."""
    import pyarrow.dataset as ds

    inp = tmp_path / "empty.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "meta": pa.array([], pa.int64())}), inp)
    with pytest.raises(SystemExit) as exit_:
        main(["run", str(inp), "-o", str(tmp_path / "out"), "--keep-columns", "meta", "--progress", "none"])
    assert exit_.value.code == 0
    assert "input has no rows" in capsys.readouterr().err
    table = ds.dataset(str(tmp_path / "out"), format="parquet").to_table()
    assert table.num_rows == 0 and {"id", "generated_text", "error", "meta"} <= set(table.column_names)
    assert (tmp_path / "out" / "_SUCCESS").exists() and read_report(tmp_path / "out")["rows"] == 0


# --- row-level: one CLI run per input schema, one test case per row ---------------------------

CTX = 64  # --max-model-len for these runs: "beyond the context window" stays cheap
NEW = 8
GOOD = "Tell me a short story about a lighthouse."

# (id, prompt bytes, sampling overrides, expected: None = correct output, "clamped", or error text)
BINARY_ROWS = [
    ("plain", GOOD.encode(), {}, None),
    ("invalid-utf8", b"caf\xc3\x28 au lait \xff", {}, "prompt is not valid UTF-8"),
    ("null-prompt", None, {}, "prompt is null"),
    ("empty-prompt", b"", {}, "prompt is empty"),
    ("whitespace-only", b" \t\n \r\n ", {}, "prompt is empty"),
    ("beyond-context", b"word " * 200, {}, f"the model's context window is {CTX} tokens"),
    ("dup", b"The first of two rows with one id.", {}, None),
    ("dup", b"The second of two rows with one id.", {}, None),
    ("negative-temperature", GOOD.encode(), {"temperature": -1.0}, "temperature must be a finite number >= 0"),
    ("infinite-temperature", GOOD.encode(), {"temperature": math.inf}, "temperature must be a finite number >= 0"),
    ("nan-temperature-is-unset", GOOD.encode(), {"temperature": math.nan}, None),
    ("temperature-1e-300-is-greedy", GOOD.encode(), {"temperature": 1e-300}, None),
    ("top-p-above-1", GOOD.encode(), {"top_p": 1.5}, "top_p must be in (0, 1]"),
    ("top-p-zero", GOOD.encode(), {"top_p": 0.0}, "top_p must be in (0, 1]"),
    ("top-k-negative", GOOD.encode(), {"top_k": -5}, "top_k must be an integer >= -1"),
    ("top-k-1e12", GOOD.encode(), {"top_k": 10**12}, None),
    ("max-new-tokens-0", GOOD.encode(), {"max_new_tokens": 0}, "max_new_tokens must be an integer >= 1"),
    ("max-new-tokens-negative", GOOD.encode(), {"max_new_tokens": -3}, "max_new_tokens must be an integer >= 1"),
    ("max-new-tokens-1e9", GOOD.encode(), {"max_new_tokens": 10**9}, "clamped"),
    ("nul-and-control-bytes", b"Hello\x00world\x07\x1b[31m red", {}, None),
    ("special-token-text", b"<|eos|><|bos|><|pad|>", {}, None),
    ("emoji-and-rtl", "Ünïcødé 🚀 مرحبا שלום 日本語".encode(), {}, None),
    (None, b"A row whose id is null gets its positional id.", {}, None),
]

MESSAGE_ROWS = [
    ("valid", [{"role": "user", "content": "Hi there"}], None),
    ("extra-keys", [{"role": "user", "content": "Hi", "name": "bob", "tool_calls": None}], None),
    ("jinja-looking-content", [{"role": "user", "content": "{{ 7 * 7 }} {% raw %}"}], None),
    ("not-json", "{not json", "messages is a string but not JSON"),
    ("object-not-list", {"role": "user", "content": "x"}, "must be a non-empty list"),
    ("empty-list", [], "must be a non-empty list"),
    ("missing-content", [{"role": "user"}], "needs string 'role' and 'content'"),
    ("number-content", [{"role": "user", "content": 42}], "needs string 'role' and 'content'"),
    ("list-of-strings", ["hello"], "needs string 'role' and 'content'"),
    ("nested-100k-deep", "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    ("null-messages", None, "is null"),
]


@pytest.fixture(scope="module")
def tiny():
    torch.set_num_threads(1)  # the references: one thread is 30x faster than two fighting the cluster
    return load_model(DEFAULT_MODEL, dtype="float32", device="cpu", max_model_len=CTX)


@pytest.fixture(scope="module")
def hostile_runs(tmp_path_factory):
    """The binary-prompt job and the messages job, side by side (a run alone leaves a core idle
    while it starts)."""
    b, m = tmp_path_factory.mktemp("hostile-binary"), tmp_path_factory.mktemp("hostile-messages")
    cols = {"id": [r[0] for r in BINARY_ROWS], "prompt": pa.array([r[1] for r in BINARY_ROWS], pa.binary())}
    for name, kind in (("temperature", pa.float64()), ("top_p", pa.float64()), ("top_k", pa.int64()),
                       ("max_new_tokens", pa.int64())):
        cols[name] = pa.array([r[2].get(name) for r in BINARY_ROWS], kind)
    pq.write_table(pa.table(cols), b / "in.parquet")
    cells = [m if m is None or isinstance(m, str) else json.dumps(m) for _, m, _ in MESSAGE_ROWS]
    pq.write_table(pa.table({"id": [r[0] for r in MESSAGE_ROWS], "messages": cells}), m / "in.parquet")
    common = ["--id-column", "id", "--max-model-len", CTX, "--max-new-tokens", NEW, "--ignore-eos",
              "--progress", "none"]
    binary, messages = run_clis(["run", b / "in.parquet", "-o", b / "out", *common, "--unit-rows", 8],
                                ["run", m / "in.parquet", "-o", m / "out", *common])
    return {"binary": (b / "out", binary), "messages": (m / "out", messages)}


@pytest.fixture(scope="module")
def binary_run(hostile_runs):
    out, res = hostile_runs["binary"]
    assert res.returncode == 0, res.stderr
    return read_rows(out), read_report(out), out


@pytest.fixture(scope="module")
def messages_run(hostile_runs):
    out, res = hostile_runs["messages"]
    assert res.returncode == 0, res.stderr
    return {r["id"]: r for r in read_rows(out)}


def _expect_row(row, tiny, prompt_ids, expected):
    if expected is None or expected == "clamped":
        n = CTX - len(prompt_ids) if expected == "clamped" else NEW
        assert row["error"] is None, row["error"]
        assert row["output_token_ids"] == hf_greedy(tiny, prompt_ids, n)
        assert row["finish_reason"] == "length" and row["num_generated_tokens"] == n
    else:
        assert row["error"] is not None and expected in row["error"], row["error"]
        assert row["output_token_ids"] is None and row["generated_text"] is None


@pytest.mark.parametrize("index", range(len(BINARY_ROWS)),
                         ids=[r[0] or "null-id" for r in BINARY_ROWS])
def test_binary_prompt_row(index, binary_run, tiny):
    rows, _, _ = binary_run
    rid, prompt, _, expected = BINARY_ROWS[index]
    rid = rid or f"in.parquet:{index}"
    mine = [r for r in rows if r["id"] == rid]
    if rid == "dup":  # both rows of the duplicated id are in the output, each with its own result
        assert len(mine) == 2
        ref = hf_greedy(tiny, tiny.tokenizer(prompt.decode())["input_ids"], NEW)
        mine = [r for r in mine if r["output_token_ids"] == ref]
    assert len(mine) == 1
    ids = tiny.tokenizer(prompt.decode())["input_ids"] if expected in (None, "clamped") else []
    _expect_row(mine[0], tiny, ids, expected)


def test_binary_run_totals(binary_run):
    rows, report, out = binary_run
    assert len(rows) == len(BINARY_ROWS)  # one output row per input row, duplicates included
    failed = sum(1 for r in BINARY_ROWS if r[3] not in (None, "clamped"))
    assert report["rows"] == len(BINARY_ROWS) and report["rows_failed"] == failed
    assert report["unit_retries"] == 0 and (out / "_SUCCESS").exists()


@pytest.mark.parametrize("index", range(len(MESSAGE_ROWS)), ids=[r[0] for r in MESSAGE_ROWS])
def test_messages_row(index, messages_run, tiny):
    rid, messages, expected = MESSAGE_ROWS[index]
    ids = []
    if expected is None:
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        ids = list(tiny.tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                                      return_dict=False))
    _expect_row(messages_run[rid], tiny, ids, expected)
