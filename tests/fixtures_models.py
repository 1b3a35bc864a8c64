"""Small random-weight models (fixed seeds) shared by the tests, and the Hugging Face
reference every greedy output is compared against."""

from __future__ import annotations

import functools
import random

import pytest
import torch

from pdbatch.engines.builtin.model import load_model
from pdbatch.toymodels import build_family, build_gpt2, build_llama


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return str(build_llama(tmp_path_factory.mktemp("models") / "llama", seed=0))


@pytest.fixture(scope="session")
def llama_other_dir(tmp_path_factory):
    """Same config as llama_dir, other weights: its KV must be refused by llama_dir's engine."""
    return str(build_llama(tmp_path_factory.mktemp("models") / "llama-other", seed=1))


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory):
    return str(build_gpt2(tmp_path_factory.mktemp("models") / "gpt2", seed=0, n_positions=512))


@pytest.fixture(scope="session")
def llama(llama_dir):
    torch.set_num_threads(1)
    return load_model(llama_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="session")
def gpt2(gpt2_dir):
    return load_model(gpt2_dir, dtype="float32", device="cpu")


def random_prompts(n: int, vocab: int, seed: int = 0, min_len: int = 1, max_len: int = 200):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


@torch.inference_mode()
@functools.cache
def _plain_model(path: str, dtype: torch.dtype):
    """The model exactly as transformers loads it: pdbatch's CPU tuning (weight layout, decode
    attention) must not leak into the reference it is checked against."""
    return load_model(path, dtype=str(dtype).removeprefix("torch."), device="cpu", tuned=False).model


def hf_greedy(lm, prompt_ids: list[int], max_new_tokens: int, stop_at_eos: bool = False) -> list[int]:
    """Hugging Face `generate`, one prompt at a time, greedy: the independent reference. Each is
    computed once per test process (several tests check the same prompts against one model)."""
    return list(_hf_greedy(lm.path, lm.dtype, tuple(prompt_ids), max_new_tokens, lm.tokenizer.pad_token_id,
                           tuple(lm.eos_token_ids) if stop_at_eos else None))


@functools.cache
def _hf_greedy(path, dtype, prompt_ids: tuple, max_new_tokens: int, pad: int | None, eos: tuple | None) -> tuple:
    ids = torch.tensor([prompt_ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite's other process and the jobs' workers share the cores:
    try:                      # two threads here would fight them (measured: 135 s for 64 prompts)
        out = _plain_model(path, dtype).generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                                 max_new_tokens=max_new_tokens, pad_token_id=pad,
                                                 eos_token_id=list(eos) if eos else None)
    finally:
        torch.set_num_threads(threads)
    gen = out[0, len(prompt_ids):].tolist()
    if eos:  # generate pads after EOS; keep up to and including the EOS
        for i, t in enumerate(gen):
            if t in eos:
                return tuple(gen[:i + 1])
    return tuple(gen)


def longrope_model(path) -> str:
    """Phi-3 long-context rope: every position's rotation switches once the pass holds a row
    longer than original_max_position_embeddings (64 here, the context is 512), so the built-in
    engine refuses it unless --max-model-len 64; vLLM runs it (head_dim 64: its CPU attention's)."""
    return str(build_family(path, "phi3", seed=0, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            original_max_position_embeddings=64,
                            rope_parameters={"rope_type": "longrope", "rope_theta": 10000.0,
                                             "short_factor": [1.0] * 32, "long_factor": [2.0] * 32,
                                             "original_max_position_embeddings": 64}))
