"""Turning a row's prompt (text, chat messages, or token ids) into token ids, with row-level
errors. A prompt cell that is a list of integers (a `list<int>` column, e.g.
`--prompt-column prompt_token_ids`) is already tokenized: it is used as is, with no special
tokens added, as vLLM's `prompt_token_ids`."""

from __future__ import annotations

import json


class RowError(ValueError):
    """A problem with one row: it becomes that row's `error`, the other rows go on."""


def encode_prompt(tokenizer, prompt=None, messages=None, vocab_size: int | None = None) -> list[int]:
    if messages is not None:
        return _in_vocab(_encode_messages(tokenizer, messages), vocab_size)
    if prompt is None:
        raise RowError("prompt is null")
    if isinstance(prompt, (list, tuple)):
        return _token_ids(prompt, vocab_size)
    if isinstance(prompt, (bytes, bytearray)):
        try:
            prompt = bytes(prompt).decode("utf-8")
        except UnicodeDecodeError as e:
            raise RowError(f"prompt is not valid UTF-8 ({e.reason} at byte {e.start})") from None
    if not isinstance(prompt, str):
        raise RowError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RowError("prompt is empty")
    ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    if not ids:
        raise RowError("prompt encodes to zero tokens")
    return _in_vocab(list(ids), vocab_size)


def _in_vocab(ids: list[int], vocab_size: int | None) -> list[int]:
    """A tokenizer can know more tokens than the model's embedding has rows (tokens added, the
    embedding not resized). Such an id makes the forward raise on CPU and trips a device-side
    assert on a GPU, which leaves that worker's CUDA context unusable: refuse the row instead."""
    if vocab_size is not None and ids and max(ids) >= vocab_size:
        raise RowError(f"the prompt's token id {max(ids)} is outside the model's vocabulary of {vocab_size} "
                       f"ids (the tokenizer has more tokens than the model's embedding)")
    return ids


def _token_ids(ids, vocab_size: int | None) -> list[int]:
    if not ids:
        raise RowError("prompt token ids are empty")
    if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
        raise RowError("prompt token ids must all be integers")
    bad = [t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)]
    if bad:
        size = f" of {vocab_size} ids" if vocab_size is not None else ""
        raise RowError(f"prompt token id {bad[0]} is outside the model's vocabulary{size}")
    return list(ids)


def _encode_messages(tokenizer, messages) -> list[int]:
    if isinstance(messages, str):  # a JSON string column is a common way to store chats
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError("messages is a string but not JSON") from None
        except RecursionError:  # e.g. "[[[[...": json recurses once per level
            raise RowError("messages JSON is nested too deeply") from None
    if not isinstance(messages, (list, tuple)) or not messages:
        raise RowError("messages must be a non-empty list of {role, content}")
    clean = []
    for m in messages:
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                or not isinstance(m.get("content"), str):
            raise RowError("each message needs string 'role' and 'content'")
        clean.append({"role": m["role"], "content": m["content"]})
    if getattr(tokenizer, "chat_template", None) is None:
        raise RowError("the model's tokenizer has no chat template; use a prompt column")
    try:
        ids = tokenizer.apply_chat_template(clean, add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
    except Exception as e:  # a template can raise anything (jinja errors, role checks)
        raise RowError(f"chat template failed: {str(e).splitlines()[0] if str(e) else e!r}") from None
    if isinstance(ids, dict):
        ids = ids["input_ids"]
    return list(ids)
