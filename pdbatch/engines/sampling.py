"""Per-sequence sampling that does not depend on batching.

Each sequence draws one uniform number per generated token from a counter-based hash of
(seed, step). No shared torch RNG state is consumed, so a row samples the same tokens whichever
rows share its batch, whichever worker runs it and whether it was prefilled on another host.
Temperature 0 means greedy (as in vLLM).

No torch here: the driver, the KV packet header and every engine share these parameters; the
built-in engine's sampler (pdbatch.engines.builtin.sampler) turns them into tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields

_MASK64 = (1 << 64) - 1
GREEDY_BELOW = 1e-5


@dataclass
class SamplingParams:
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    seed: int = 0
    max_new_tokens: int = 64
    stop_token_ids: list[int] = field(default_factory=list)
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False

    def __post_init__(self):
        # lists may arrive as tuples (msgpack headers) or a bare string (a job file's `stop = "x"`)
        self.stop = [self.stop] if isinstance(self.stop, str) else list(self.stop)
        self.stop_token_ids = [int(t) for t in self.stop_token_ids]

    def validate(self) -> None:
        """Raise ValueError naming the bad value; the caller turns it into a row error."""
        t = self.temperature
        if not isinstance(t, (int, float)) or math.isnan(t) or t < 0 or math.isinf(t):
            raise ValueError(f"temperature must be a finite number >= 0, got {t!r}")
        p = self.top_p
        if not isinstance(p, (int, float)) or math.isnan(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k must be an integer >= -1 (0 or -1 disables it), got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if not isinstance(self.seed, int):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if any(not isinstance(s, str) or s == "" for s in self.stop):
            raise ValueError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def greedy(self) -> bool:
        # as vLLM (_SAMPLING_EPS): below 1e-5, logits / temperature overflows to inf and the
        # softmax to NaN, which would sample garbage; such a temperature means greedy anyway
        return self.temperature < GREEDY_BELOW

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def uniform(seed: int, step: int) -> float:
    """A uniform number in [0, 1) that depends only on (seed, step)."""
    h = splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))
    return (h >> 11) * (1.0 / (1 << 53))


def row_seed(job_seed: int, row_id: str) -> int:
    """Default per-row seed: stable across runs, workers and Python processes (no hash())."""
    h = job_seed & _MASK64
    for b in row_id.encode("utf-8"):
        h = splitmix64(h ^ b)
    return h & ((1 << 63) - 1)
