"""pdbatch's per-row sampling inside vLLM, as a vLLM logits processor.

vLLM's own seeded sampling draws from a per-request torch.Generator, so a row prefilled on
one worker and decoded on another would restart that stream on the decode side, and in vLLM
0.32's CPU build a seeded request whose prompt is split into chunks fails the whole engine
step (`CPU Generator does not use offset`). So pdbatch samples itself, with the rule the
built-in engine uses (`sampling.sample_next`: temperature, top-k, top-p and one uniform draw
from a counter-based hash of (seed, step)): a row gets the same tokens whichever rows share
its batch, whichever engine or worker runs each phase, and in both modes.

Rows that sample carry `extra_args["pdbatch_sampling"]` and are sent to vLLM as greedy
(temperature 0); this processor leaves only the token pdbatch picked for them finite, so
vLLM's greedy pick is that token. Greedy rows are not touched.
"""

from __future__ import annotations

import torch
from vllm.v1.sample.logits_processor import LogitsProcessor
from vllm.v1.sample.logits_processor.builtin import process_dict_updates

from ..builtin.sampler import sample_next  # the built-in engine's rule, shared
from ..sampling import SamplingParams

KEY = "pdbatch_sampling"


def sampling_args(params: SamplingParams, first_step: int) -> dict:
    """extra_args entry for a row that samples; `first_step`: tokens the row had generated
    before this vLLM request (1 on the decode side, whose prompt ends with the first token)."""
    return {"temperature": params.temperature, "top_p": params.top_p, "top_k": params.top_k,
            "seed": params.seed, "first_step": first_step}


class PdbatchSampler(LogitsProcessor):
    def __init__(self, vllm_config, device: torch.device, is_pin_memory: bool):
        self.rows: dict[int, tuple[SamplingParams, int, list[int]]] = {}  # batch index -> state

    def is_argmax_invariant(self) -> bool:
        return False

    @staticmethod
    def _state(params, prompt_ids, output_ids):
        args = (params.extra_args or {}).get(KEY) if params is not None else None
        if not args:
            return None
        p = SamplingParams(temperature=args["temperature"], top_p=args["top_p"], top_k=args["top_k"],
                           seed=args["seed"])
        return p, int(args["first_step"]), output_ids  # output_ids: vLLM's live list of the row's tokens

    def update_state(self, batch_update) -> None:
        process_dict_updates(self.rows, batch_update, self._state)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.rows:
            return logits
        index = sorted(i for i in self.rows if i < logits.shape[0])
        states = [self.rows[i] for i in index]
        picks = sample_next(logits[index], [p for p, _, _ in states],
                            [first + len(out) for _, first, out in states])
        rows = torch.tensor(index, device=logits.device)
        logits[rows] = float("-inf")
        logits[rows, torch.tensor(picks, device=logits.device)] = 0.0
        return logits
