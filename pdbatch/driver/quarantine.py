"""Bounded retries, then quarantine of the rows that keep failing.

A unit whose task failed, or whose prefill/decode worker left (killed, OOM, node lost), is
started again from its prompts, up to `--max-attempts` times in all (pipeline.py). A unit that
fails that often is not retried whole again: most likely one of its rows breaks whatever runs it
(a prompt that makes the tokenizer or the model blow past the worker's memory, a row that
crashes a kernel). Its rows are then tried one at a time, each ALONE on the cluster: the driver
admits no new units, lets the ones in flight finish, and runs one single-row "probe" at a time.

- A probe that succeeds keeps its result.
- A probe that fails with nothing else running is the culprit for sure; its row is written with
  error "quarantined after N failed attempts: <last reason>" and the job goes on.
- If the first rows of a unit (up to three) all fail alone too, the cause is not a row (a model
  that no longer loads, workers that keep dying for other reasons): the job stops (exit 1)
  instead of writing a dataset of errors.

Why alone: a worker's death takes every unit it held with it, so a unit can fail without being
guilty. Only a row that fails with nothing beside it can be blamed, which means an innocent row is
never quarantined. The price is throughput while a suspect unit is probed; it takes
`--max-attempts` failures of one unit to get there, and smaller `--unit-rows` make it cheaper.
When the probes are done, the driver writes the unit's shard itself (one row per input row, as
always) and records it in the manifest like any other unit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import deque
from dataclasses import dataclass, field

from ..engines.request import SequenceOutput

log = logging.getLogger("pdbatch")

SYSTEMATIC_AFTER = 3  # this many first rows of a unit failing alone: not a row problem


@dataclass
class Suspect:
    unit: object  # the pipeline's _Unit: its WorkUnit, rows table and kept columns
    failures: int  # attempts the whole unit used
    last_error: str
    next_row: int = 0
    outputs: list[SequenceOutput] = field(default_factory=list)  # one per probed row, in order
    passed: int = 0

    @property
    def rows(self) -> int:
        return self.unit.rows.num_rows

    @property
    def complete(self) -> bool:
        return len(self.outputs) == self.rows

    @property
    def systematic(self) -> bool:
        probed = len(self.outputs)
        return self.rows > 1 and self.passed == 0 and probed >= min(SYSTEMATIC_AFTER, self.rows)


class Quarantine:
    def __init__(self):
        self.queue: deque[Suspect] = deque()
        self.rows_quarantined = 0

    @property
    def active(self) -> bool:
        return bool(self.queue)

    def add(self, unit, failures: int, why: str) -> None:
        log.warning("unit %s failed %d times (last: %s); trying its %d rows one at a time, alone on "
                    "the cluster", unit.unit.unit_id, failures, why, unit.rows.num_rows)
        self.queue.append(Suspect(unit, failures, why))

    def next_probe(self):
        """(suspect, work unit of its next row, rows table of that row), or None when the head
        suspect has been probed entirely (then `pop` it and write it)."""
        s = self.queue[0]
        if s.next_row >= s.rows:
            return None
        i = s.next_row
        s.next_row += 1
        parent = s.unit.unit
        wu = dataclasses.replace(parent, unit_id=f"{parent.unit_id}-row{i}", start=parent.start + i,
                                 num_rows=1, file_row=parent.file_row + i)
        return s, wu, s.unit.rows.slice(i, 1)

    def passed(self, s: Suspect, output: SequenceOutput) -> None:
        s.outputs.append(output)
        s.passed += 1

    def failed(self, s: Suspect, row_id: str, why: str) -> None:
        n = s.failures + 1
        log.error("row %s quarantined after %d failed attempts (the last one alone on the cluster): %s",
                  row_id, n, why)
        s.outputs.append(SequenceOutput.failed(row_id, f"quarantined after {n} failed attempts: {why}"))
        self.rows_quarantined += 1

    def pop(self) -> Suspect:
        return self.queue.popleft()
