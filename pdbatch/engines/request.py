"""The unit of work inside the engines: one request in, one output out."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from .sampling import SamplingParams


@dataclass
class Request:
    id: str
    prompt_ids: list[int]
    params: SamplingParams
    arrival_time: float = field(default_factory=time.time)


@dataclass
class SequenceOutput:
    """One row of the result. Times are wall-clock seconds (time.time()), so they can be
    compared across worker processes on the same host (and roughly across hosts)."""

    id: str
    output_token_ids: list[int] = field(default_factory=list)
    generated_text: str | None = None
    num_prompt_tokens: int = 0
    finish_reason: str | None = None  # "stop" | "length" | None on error
    ttft_s: float | None = None
    tpot_s: float | None = None
    prefill_worker: str | None = None
    decode_worker: str | None = None
    error: str | None = None
    kv_bytes: int = 0  # size of the KV packet that carried this row between phases
    kv_transfer_s: float | None = None

    @property
    def num_generated_tokens(self) -> int:
        return len(self.output_token_ids)

    @classmethod
    def failed(cls, id: str, error: str, num_prompt_tokens: int = 0, worker: str | None = None):
        return cls(id=id, error=error, num_prompt_tokens=num_prompt_tokens, prefill_worker=worker)
