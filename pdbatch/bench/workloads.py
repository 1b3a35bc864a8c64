"""Benchmark workloads: prompt and output length distributions, by name or by parameters.

A workload is a list of prompts given as token ids (so prompt lengths are exact for any
tokenizer) and an output length per row; every system generates exactly that many tokens
(greedy, EOS ignored), so all of them do the same work and their outputs can be compared.

    summarize  long prompt, short output     prompts 512-1024 tokens, outputs 16-64
    generate   short prompt, long output     prompts 16-64 tokens,    outputs 256-512
    uniform    the engine benchmark's mix    prompts 32-512 tokens,   outputs 16-256
    fixed      every row the same shape      prompts 256 tokens,      outputs 128

Lengths are written `A-B` (uniform between A and B, inclusive) or `N` (fixed). A prefix share
s in [0, 1) starts each prompt with its first round(s x length) tokens taken from one shared
"system prompt", as chat workloads do.
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict, dataclass

from pdbatch.errors import UserError

PRESETS = {
    "summarize": {"prompt_len": (512, 1024), "output_len": (16, 64)},
    "generate": {"prompt_len": (16, 64), "output_len": (256, 512)},
    "uniform": {"prompt_len": (32, 512), "output_len": (16, 256)},
    "fixed": {"prompt_len": (256, 256), "output_len": (128, 128)},
}
PROMPT_COLUMN = "prompt_token_ids"  # list<int32>: pdbatch uses token-id prompts as they are
ID_COLUMN = "row"


def parse_range(text: str | tuple, what: str) -> tuple[int, int]:
    """'A-B' (uniform) or 'N' (fixed) -> (lo, hi)."""
    if isinstance(text, tuple):
        return text
    m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", str(text))
    if not m:
        raise UserError(f"{what} must be N or A-B (e.g. 256 or 32-512), got {text!r}")
    lo, hi = int(m.group(1)), int(m.group(2) or m.group(1))
    if lo < 1 or hi < lo:
        raise UserError(f"{what} {text!r}: need 1 <= A <= B")
    return lo, hi


@dataclass
class WorkloadSpec:
    name: str
    rows: int
    prompt_len: tuple[int, int]
    output_len: tuple[int, int]
    prefix_share: float = 0.0
    seed: int = 0

    @classmethod
    def build(cls, name: str, rows: int, prompt_len=None, output_len=None, prefix_share: float = 0.0,
              seed: int = 0) -> WorkloadSpec:
        if name not in PRESETS and not (prompt_len and output_len):
            raise UserError(f"unknown workload {name!r}: choose {', '.join(PRESETS)}, or give "
                            f"--prompt-len and --output-len with any name")
        base = PRESETS.get(name, {})
        spec = cls(name=name, rows=rows,
                   prompt_len=parse_range(prompt_len or base["prompt_len"], "--prompt-len"),
                   output_len=parse_range(output_len or base["output_len"], "--output-len"),
                   prefix_share=prefix_share, seed=seed)
        if rows < 1:
            raise UserError(f"--rows must be >= 1, got {rows}")
        if not 0 <= prefix_share < 1:
            raise UserError(f"--prefix-share must be in [0, 1), got {prefix_share}")
        return spec

    def check_fits(self, max_model_len: int) -> None:
        need = self.prompt_len[1] + self.output_len[1]
        if need > max_model_len:
            raise UserError(f"workload {self.name}: prompts up to {self.prompt_len[1]} + outputs up to "
                            f"{self.output_len[1]} tokens exceed the model's context of {max_model_len}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["prompt_len"], d["output_len"] = list(self.prompt_len), list(self.output_len)
        return d


def token_pool(tokenizer, vocab_size: int) -> list[int]:
    """Ids a prompt may use: inside both the model's and the tokenizer's vocabulary (so every
    prompt also has a text form), never a special token."""
    special = set(tokenizer.all_special_ids or [])
    n = min(vocab_size, len(tokenizer))
    pool = [i for i in range(3, n) if i not in special]
    if not pool:
        raise UserError("the tokenizer has no ordinary tokens to build prompts from")
    return pool


def make_workload(spec: WorkloadSpec, pool: list[int]):
    """An engine-benchmark Workload (prompts, out_lens), the type its baselines take."""
    from pdbatch.bench.engine import Workload

    rng = random.Random(spec.seed)
    system = [rng.choice(pool) for _ in range(spec.prompt_len[1])]
    prompts, out_lens = [], []
    for _ in range(spec.rows):
        n = rng.randint(*spec.prompt_len)
        shared = min(n - 1, round(spec.prefix_share * n))
        prompts.append(system[:shared] + [rng.choice(pool) for _ in range(n - shared)])
        out_lens.append(rng.randint(*spec.output_len))
    return Workload(prompts, out_lens)


def write_input(work, path: str) -> str:
    """The workload as pdbatch input: token-id prompts, per-row max_new_tokens, a row id."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    table = pa.table({ID_COLUMN: pa.array(range(len(work.prompts)), pa.int64()),
                      PROMPT_COLUMN: pa.array(work.prompts, pa.list_(pa.int32())),
                      "max_new_tokens": pa.array(work.out_lens, pa.int32())})
    pq.write_table(table, path)
    return path


def warmup_workload(work, rows: int):
    """A few short rows from the workload: first-call costs (allocations, kernel choice)."""
    from pdbatch.bench.engine import Workload

    prompts = [work.prompts[i % len(work.prompts)][:40] for i in range(rows)]
    return Workload(prompts, [3] * rows)
