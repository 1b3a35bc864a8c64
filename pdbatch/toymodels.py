"""Small random-weight Hugging Face causal LMs, built deterministically from a seed.

They give tests, benchmarks and the default model (``data/tiny-llama``) something real to run
with no download: each builder writes an ordinary Hugging Face model directory
(``config.json``, ``model.safetensors``, ``generation_config.json`` and the tokenizer files),
which ``AutoModelForCausalLM.from_pretrained(dir)`` and ``AutoTokenizer.from_pretrained(dir)``
load like any model from the Hub. The weights are random, so the generated text is noise, but
the shapes, the attention variant (rotary + GQA for Llama, learned positions for GPT-2) and
the special tokens are those of real models.

    from pdbatch.toymodels import build_llama, build_gpt2, BENCH_LLAMA_30M
    build_llama("/tmp/tiny")                      # ~1.25M parameters, the default tokenizer
    build_llama("/tmp/bench", **BENCH_LLAMA_30M)  # ~31.6M parameters, for benchmarks
    build_gpt2("/tmp/gpt2", seed=1)

Same arguments and seed -> byte-identical ``model.safetensors`` (for a given torch and
transformers version, which ``config.json`` records).
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import torch
from transformers import (
    AutoTokenizer,
    GenerationConfig,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.pytorch_utils import Conv1D

# The default model and tokenizer, shipped in the repository (regenerate with
# scripts/make_data.py). Builders copy this tokenizer when no tokenizer_dir is given.
DEFAULT_MODEL_DIR = Path(__file__).resolve().parent.parent / "data" / "tiny-llama"

# Files of a Hugging Face tokenizer that builders copy into the model directory.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
)

# Shapes of the default model in data/tiny-llama: 4 layers, 4 query heads sharing 2 KV heads
# (head_dim 32), tied input/output embeddings. With the 4096-token default tokenizer that is
# 1.25M parameters, 5 MB in fp32.
TINY_LLAMA = dict(
    hidden_size=128,
    intermediate_size=344,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)

# LlamaConfig kwargs of a ~30M-parameter model for benchmarks: build_llama(path, **BENCH_LLAMA_30M).
# 23.2M parameters in the 8 layers + 8.4M in the tied 16384 x 512 embedding = 31.6M. Benchmarks
# feed token ids directly, so the vocabulary is larger than the tokenizer's (ids >= 4096 have no
# text). The vocabulary is kept at 16K rather than Llama-2's 32K so the output projection stays
# about a quarter of the per-token FLOPs, closer to the share it has in billion-parameter models.
# KV cache: 2 x 8 layers x 4 heads x 64 dims = 4096 values per token (16 KiB fp32, 8 KiB bf16).
BENCH_LLAMA_30M = dict(
    vocab_size=16384,
    hidden_size=512,
    intermediate_size=1376,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)

# --- Weight initialisation -------------------------------------------------------------------
# Hugging Face's default init (normal, std 0.02) makes a random model useless for testing a
# decoder: every layer adds almost nothing to the residual stream, the last hidden state is
# essentially the current token's embedding, and greedy decoding repeats one token forever
# (measured: 32 copies of the same id from every prompt). So every parameter is re-drawn here,
# in sorted-name order from one seeded generator (independent of transformers' own init code):
#
#  * hidden-to-hidden weights (attention q/k/v/o, MLP): normal with std LAYER_GAIN/sqrt(fan_in).
#    A gain of 2 makes each layer's output larger than its input (residual RMS grows to ~10-20
#    by the last layer, harmless in fp32/bf16/fp16), and sharpens attention (q.k/sqrt(d) has
#    std ~4), so the next token depends on the whole context, not just the last token. Gains of
#    1-1.5 still gave runs of one repeated token, especially in GPT-2. With 2, greedy
#    generations of 32 tokens hold 15-32 distinct tokens (mean 31 for tiny-llama over the 64
#    sample prompts, ~24 for GPT-2), and changing any single token of a 100-300-token prompt
#    (first, middle or near the end) changed the 16-token continuation in 9-10 prompts of 10,
#    so a decoder that drops or misplaces part of the KV cache shows up in its output.
#  * token/position embeddings and an untied lm_head: std LOGIT_STD/sqrt(hidden_size), so that
#    logits = norm(h) @ W.T have std ~LOGIT_STD whether or not the embeddings are tied. Five
#    puts the top token at ~0.4-0.5 probability on average: sampling is not uniform noise and
#    not always the argmax, and the gap between the top two logits is wide enough that fp32
#    rounding differences (batched vs. single, padded vs. not) rarely flip a greedy choice.
#  * norm weights 1, biases 0 (as in a freshly initialised real model).
LAYER_GAIN = 2.0
LOGIT_STD = 5.0


def build_llama(
    path: str | Path,
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    hidden_size: int = TINY_LLAMA["hidden_size"],
    intermediate_size: int = TINY_LLAMA["intermediate_size"],
    num_hidden_layers: int = TINY_LLAMA["num_hidden_layers"],
    num_attention_heads: int = TINY_LLAMA["num_attention_heads"],
    num_key_value_heads: int = TINY_LLAMA["num_key_value_heads"],
    max_position_embeddings: int = TINY_LLAMA["max_position_embeddings"],
    tie_word_embeddings: bool = TINY_LLAMA["tie_word_embeddings"],
    **config_kwargs,
) -> Path:
    """Build a random Llama-style model (RMSNorm, rotary positions, GQA, SwiGLU) into ``path``.

    Arguments are LlamaConfig's; ``config_kwargs`` go to LlamaConfig unchanged (e.g.
    ``rope_parameters``, ``head_dim``). ``vocab_size`` defaults to the tokenizer's size and may
    be larger, not smaller. ``tokenizer_dir`` defaults to the tokenizer of ``data/tiny-llama``.
    Returns ``path``.
    """
    tokenizer_dir = Path(tokenizer_dir or DEFAULT_MODEL_DIR)
    special = _special_token_ids(tokenizer_dir, vocab_size)
    config = LlamaConfig(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_key_value_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
        **special,
        **config_kwargs,
    )
    return _build(LlamaForCausalLM, config, path, seed, tokenizer_dir)


# Shapes that vLLM's CPU attention accepts (head_dim 64; it takes 32, 64, 80, ... but not 16):
# build_llama(path, **VLLM_SMALL) or build_qwen2(path, **VLLM_SMALL). 2 layers, 4 query heads
# sharing 2 KV heads; with the default 4096-token tokenizer ~1.9M parameters.
VLLM_SMALL = dict(
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=2048,
    tie_word_embeddings=True,
)


def build_qwen2(
    path: str | Path,
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    **config_kwargs,
) -> Path:
    """Build a random Qwen2-style model (Llama's layout plus biases on the q/k/v projections,
    which init_weights zeroes) into ``path``. Arguments are Qwen2Config's, with
    :data:`VLLM_SMALL`'s shapes by default; see :func:`build_llama` for the rest."""
    tokenizer_dir = Path(tokenizer_dir or DEFAULT_MODEL_DIR)
    special = _special_token_ids(tokenizer_dir, vocab_size)
    config = Qwen2Config(**{**VLLM_SMALL, **config_kwargs}, **special)
    return _build(Qwen2ForCausalLM, config, path, seed, tokenizer_dir)


def build_gpt2(
    path: str | Path,
    *,
    seed: int = 0,
    tokenizer_dir: str | Path | None = None,
    vocab_size: int | None = None,
    n_embd: int = 128,
    n_layer: int = 4,
    n_head: int = 4,
    n_inner: int | None = None,
    n_positions: int = 1024,
    **config_kwargs,
) -> Path:
    """Build a random GPT-2-style model (LayerNorm, learned absolute positions, full multi-head
    attention, GELU MLP of width ``n_inner`` = 4 x n_embd by default, tied embeddings).

    Arguments are GPT2Config's; see :func:`build_llama` for the rest. Dropout is off.
    """
    tokenizer_dir = Path(tokenizer_dir or DEFAULT_MODEL_DIR)
    special = _special_token_ids(tokenizer_dir, vocab_size)
    config = GPT2Config(
        n_embd=n_embd,
        n_layer=n_layer,
        n_head=n_head,
        n_inner=n_inner,
        n_positions=n_positions,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        **special,
        **config_kwargs,
    )
    return _build(GPT2LMHeadModel, config, path, seed, tokenizer_dir)


def build_family(path: str | Path, model_type: str, *, seed: int = 0,
                 tokenizer_dir: str | Path | None = None, vocab_size: int | None = None,
                 **config_kwargs) -> Path:
    """Build a random model of any transformers causal-LM family (``model_type`` as in
    config.json: "mistral", "gemma2", "bloom", ...) from ``config_kwargs``, dropout off.
    Used by the architecture tests (tests/test_model_families.py)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer_dir = Path(tokenizer_dir or DEFAULT_MODEL_DIR)
    special = _special_token_ids(tokenizer_dir, vocab_size)
    config = AutoConfig.for_model(model_type, **special, **config_kwargs)
    for name in ("attention_dropout", "hidden_dropout", "resid_pdrop", "embd_pdrop", "attn_pdrop"):
        if hasattr(config, name):
            setattr(config, name, 0.0)
    cls = AutoModelForCausalLM._model_mapping[type(config)]
    return _build(cls, config, path, seed, tokenizer_dir)


def init_weights(model: PreTrainedModel, seed: int) -> None:
    """Re-draw every parameter of ``model`` as described above, deterministically from ``seed``."""
    generator = torch.Generator().manual_seed(seed)
    # named_parameters() lists a tied weight once, under the embedding's name.
    for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
        module = model.get_submodule(name.rpartition(".")[0])
        with torch.no_grad():
            if name.endswith(".bias"):
                param.zero_()
            elif isinstance(module, torch.nn.Embedding):
                std = LOGIT_STD / math.sqrt(module.embedding_dim)
                param.normal_(0.0, std, generator=generator)
            elif isinstance(module, (torch.nn.Linear, Conv1D)):
                # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
                fan_in = param.shape[1] if isinstance(module, torch.nn.Linear) else param.shape[0]
                gain = LOGIT_STD if module is model.get_output_embeddings() else LAYER_GAIN
                param.normal_(0.0, gain / math.sqrt(fan_in), generator=generator)
            elif param.dim() == 1:  # RMSNorm / LayerNorm scale (and attention sinks)
                param.fill_(1.0)
            elif param.dim() in (2, 3):  # fused MoE experts [experts, out, in], other matrices
                param.normal_(0.0, LAYER_GAIN / math.sqrt(param.shape[-1]), generator=generator)
            else:
                raise TypeError(f"init_weights: no rule for {name} in {type(module).__name__}")


def _special_token_ids(tokenizer_dir: Path, vocab_size: int | None) -> dict:
    """vocab_size and bos/eos/pad ids for the model config, taken from the tokenizer."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    if vocab_size is None:
        vocab_size = len(tokenizer)
    elif vocab_size < len(tokenizer):
        raise ValueError(f"vocab_size {vocab_size} < the tokenizer's {len(tokenizer)} tokens")
    return dict(
        vocab_size=vocab_size,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _build(model_cls, config, path, seed: int, tokenizer_dir: Path) -> Path:
    path = Path(path)
    # Construction runs transformers' own random init; keep it from moving the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        model = model_cls(config).to(torch.float32).eval()
    init_weights(model, seed)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id,
        eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id,
    )
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    _copy_tokenizer(tokenizer_dir, path)
    return path


def _copy_tokenizer(src: Path, dst: Path) -> None:
    """Copy the tokenizer files byte for byte (re-saving through transformers may rewrite them)."""
    if src.resolve() == dst.resolve():
        return
    for name in TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
