"""One vLLM cache for the whole test session, its model-class records written once.

Without a record in VLLM_CACHE_ROOT/modelinfos, every vLLM engine start inspects its model
class in a subprocess that imports vLLM and torch again (~10 s of CPU here; the vLLM jobs
fixture starts six engines at once). The controller process (pytest_configure, before the
xdist workers start, so they inherit the environment) points VLLM_CACHE_ROOT at a fresh
folder and writes the records for the architectures the tests build in a background
process; the fixtures that start engines wait for it (`wait_warm`). Writes are atomic in
vLLM, so a test that misses the record only pays the inspection itself."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM")  # the models the vLLM tests build
DONE = ".warm-done"
WARM = f"""
try:
    from vllm.model_executor.models.registry import ModelRegistry
    for arch in {ARCHITECTURES!r}:
        ModelRegistry._try_inspect_model_cls(arch)
finally:  # done, or given up: nobody waits for a writer that failed
    open({DONE!r}, "w").close()
"""
_warm: subprocess.Popen | None = None


def start(config) -> None:
    global _warm
    if hasattr(config, "workerinput") or "VLLM_CACHE_ROOT" in os.environ:
        return  # an xdist worker (it inherited the controller's), or the user chose one
    if importlib.util.find_spec("vllm") is None:
        return
    root = tempfile.mkdtemp(prefix="pdbatch-test-vllm-cache-")
    os.environ["VLLM_CACHE_ROOT"] = root
    _warm = subprocess.Popen([sys.executable, "-c", WARM], cwd=root, env=os.environ.copy(),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(config) -> None:
    global _warm
    if _warm is None:
        return
    if _warm.poll() is None:
        _warm.kill()  # by its PID: the one process this module started
    _warm.wait()
    _warm = None
    shutil.rmtree(os.environ.pop("VLLM_CACHE_ROOT"), ignore_errors=True)


def wait_warm(timeout: float = 120) -> None:
    """Until the session's records are written (or the writer gave up: engines then inspect)."""
    root = os.environ.get("VLLM_CACHE_ROOT")
    if not root or not root.startswith(os.path.join(tempfile.gettempdir(), "pdbatch-test-vllm-cache-")):
        return
    deadline = time.time() + timeout
    while not (Path(root) / DONE).exists() and time.time() < deadline:
        time.sleep(0.5)
