"""Turning a row's prompt (text or chat messages) into token ids, with row-level errors."""

from __future__ import annotations

import json


class RowError(ValueError):
    """A problem with one row: it becomes that row's `error`, the other rows go on."""


def encode_prompt(tokenizer, prompt=None, messages=None) -> list[int]:
    if messages is not None:
        return _encode_messages(tokenizer, messages)
    if prompt is None:
        raise RowError("prompt is null")
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
    return list(ids)


def _encode_messages(tokenizer, messages) -> list[int]:
    if isinstance(messages, str):  # a JSON string column is a common way to store chats
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise RowError("messages is a string but not JSON") from None
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
