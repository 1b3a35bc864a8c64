"""The shipped default model/tokenizer/sample data, and the random-model builders."""

from __future__ import annotations

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from pdbatch.toymodels import (
    BENCH_LLAMA_30M,
    DEFAULT_MODEL_DIR,
    TINY_LLAMA,
    build_gpt2,
    build_llama,
)

SAMPLE = DEFAULT_MODEL_DIR.parent / "sample.parquet"
PROMPTS = [
    "The quick brown fox jumps over the lazy dog.",
    "def fibonacci(n):",
    "Bonjour, je m'appelle Zoé et j'habite à Paris.",
    "東京は日本の首都です。🌊",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(DEFAULT_MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL_DIR)


def greedy(model, tokenizer, prompts, max_new_tokens=32):
    """Greedy continuations of a left-padded batch, as lists of new token ids (eos ignored)."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True, padding_side="left")
    with torch.no_grad():
        out = model.generate(
            **batch, max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None,
            output_scores=True, return_dict_in_generate=True,
        )
    assert all(torch.isfinite(scores).all() for scores in out.scores)
    return out.sequences[:, batch["input_ids"].shape[1]:].tolist()


def test_default_model_and_tokenizer(model, tokenizer):
    config = model.config
    assert config.model_type == "llama" and model.dtype == torch.float32
    assert config.num_key_value_heads < config.num_attention_heads  # GQA
    assert config.vocab_size == len(tokenizer) == 4096
    assert 1_000_000 < model.num_parameters() < 1_500_000
    special = (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id)
    assert special == (0, 1, 2)
    for cfg in (config, model.generation_config):
        assert (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == special

    text = "Crème brûlée, 你好, 🍕 and\ttabs\n"
    ids = tokenizer(text)["input_ids"]
    assert ids[0] == tokenizer.bos_token_id
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # byte-level: lossless


def test_chat_template(tokenizer):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi, ça va? 👋"},
    ]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|bos|><|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nHi, ça va? 👋<|im_end|>\n<|im_start|>assistant\n"
    )
    no_prompt = tokenizer.apply_chat_template(messages, tokenize=False)
    assert text.startswith(no_prompt) and not no_prompt.endswith("assistant\n")

    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)["input_ids"]
    im_start, im_end = tokenizer.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert ids[0] == tokenizer.bos_token_id and ids.count(tokenizer.bos_token_id) == 1
    assert ids.count(im_start) == 3 and ids.count(im_end) == 2
    assert tokenizer.decode(ids) == text


def test_greedy_outputs_vary_and_depend_on_whole_prompt(model, tokenizer):
    outputs = greedy(model, tokenizer, PROMPTS)
    assert len({tuple(o) for o in outputs}) == len(PROMPTS)
    for out in outputs:
        assert len(set(out)) >= 12, out  # not one token repeated

    # Changing only the first word of a prompt changes its continuation.
    changed = greedy(model, tokenizer, ["A" + PROMPTS[0][3:]], max_new_tokens=16)[0]
    assert changed != outputs[0][:16]


def test_shipped_weights_match_builder(tmp_path):
    build_llama(tmp_path, seed=0, tokenizer_dir=DEFAULT_MODEL_DIR, **TINY_LLAMA)
    shipped = load_file(DEFAULT_MODEL_DIR / "model.safetensors")
    built = load_file(tmp_path / "model.safetensors")
    assert shipped.keys() == built.keys()
    assert all(torch.equal(shipped[k], built[k]) for k in shipped), (
        "pdbatch/toymodels.py no longer reproduces data/tiny-llama: run scripts/make_data.py"
    )


SMALL_LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2)


@pytest.mark.parametrize("build, kwargs", [
    (build_llama, SMALL_LLAMA),
    (build_gpt2, dict(n_embd=64, n_layer=2, n_head=4, n_positions=256)),
])
def test_builders_are_deterministic(tmp_path, build, kwargs):
    a = build(tmp_path / "a", seed=0, **kwargs)
    b = build(tmp_path / "b", seed=0, **kwargs)
    c = build(tmp_path / "c", seed=1, **kwargs)
    weights = {d: (d / "model.safetensors").read_bytes() for d in (a, b, c)}
    assert weights[a] == weights[b] != weights[c]

    model = AutoModelForCausalLM.from_pretrained(a)
    tokenizer = AutoTokenizer.from_pretrained(a)
    assert (a / "generation_config.json").is_file()
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    outputs = greedy(model, tokenizer, PROMPTS[:2], max_new_tokens=16)
    assert all(len(set(out)) >= 6 for out in outputs), outputs


def test_vocab_larger_than_tokenizer(tmp_path):
    build_llama(tmp_path, vocab_size=5000, **SMALL_LLAMA)
    model = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert model.config.vocab_size == 5000
    assert model(torch.tensor([[1, 4999]])).logits.shape == (1, 2, 5000)
    with pytest.raises(ValueError, match="vocab_size"):
        build_llama(tmp_path / "small", vocab_size=100)


def test_bench_config_size():
    with torch.device("meta"):
        model = LlamaForCausalLM(LlamaConfig(**BENCH_LLAMA_30M))
    assert 25e6 < model.num_parameters() < 35e6
    assert BENCH_LLAMA_30M["num_key_value_heads"] < BENCH_LLAMA_30M["num_attention_heads"]


def test_sample_parquet(tokenizer):
    table = pq.read_table(SAMPLE)
    assert table.column_names == ["id", "prompt"] and table.num_rows == 64
    ids = table.column("id").to_pylist()
    prompts = table.column("prompt").to_pylist()
    assert ids == [f"sample-{i:03d}" for i in range(64)]
    assert len(set(prompts)) == 64
    assert any(ord(ch) > 0x3000 for p in prompts for ch in p)  # CJK / emoji present
    lengths = [len(tokenizer(p)["input_ids"]) for p in prompts]
    assert min(lengths) < 10 and 200 < max(lengths) <= 300
