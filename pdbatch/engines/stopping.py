"""When a sequence is finished, and what its final text is (vLLM semantics).

- EOS (or any `stop_token_ids`) ends with finish_reason "stop"; the stop token stays in
  `output_token_ids`, special tokens are dropped from the text. `ignore_eos` disables EOS only.
- A stop string ends with "stop"; the text is cut before the stop string.
- Reaching `max_new_tokens` (after clamping to the context window) ends with "length".
"""

from __future__ import annotations

from .request import SequenceOutput
from .sampling import SamplingParams


class StopChecker:
    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer = tokenizer
        self.eos = set(eos_token_ids)

    def check(self, params: SamplingParams, gen_ids: list[int]) -> str | None:
        last = gen_ids[-1]
        if (last in self.eos and not params.ignore_eos) or last in params.stop_token_ids:
            return "stop"
        if params.stop and self._find_stop(params, gen_ids) is not None:
            return "stop"
        if len(gen_ids) >= params.max_new_tokens:
            return "length"
        return None

    def _find_stop(self, params: SamplingParams, gen_ids: list[int]) -> int | None:
        # Only the tail can hold a stop string that was not there one step ago.
        longest = max(len(s) for s in params.stop)
        tail = self.tokenizer.decode(gen_ids[-(longest + 8):], skip_special_tokens=True)
        return 0 if any(s in tail for s in params.stop) else None

    def text(self, params: SamplingParams, gen_ids: list[int]) -> str:
        text = self.tokenizer.decode(gen_ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in params.stop if s in text]
        return text[:min(cuts)] if cuts else text

    def output(self, seq_id: str, params: SamplingParams, prompt_len: int, gen_ids: list[int],
               reason: str, arrival: float, first_token_time: float, last_token_time: float,
               **extra) -> SequenceOutput:
        n = len(gen_ids)
        tpot = (last_token_time - first_token_time) / (n - 1) if n > 1 else None
        return SequenceOutput(id=seq_id, output_token_ids=list(gen_ids),
                              generated_text=self.text(params, gen_ids), num_prompt_tokens=prompt_len,
                              finish_reason=reason, ttft_s=first_token_time - arrival, tpot_s=tpot,
                              **extra)
