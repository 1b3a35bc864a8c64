"""Fault injection for the tests (off unless its environment variable is set on the workers).

PDBATCH_FAULT_UNSERIALIZABLE=<row id>[,<row id>...]: a prefill unit holding one of these rows
returns, in that row's place, an object whose serialization raises; the unit must then be
retried, quarantined row by row and that row written with the error (tests/test_model_families.py).
"""

from __future__ import annotations

import os

ENV_UNSERIALIZABLE = "PDBATCH_FAULT_UNSERIALIZABLE"


class Unserializable:
    def __init__(self, row_id: str):
        self.row_id = row_id

    def __reduce__(self):
        raise TypeError(f"injected fault: row {self.row_id}'s result cannot be serialized")


def inject_unserializable(results: list, row_ids: list) -> list:
    bad = set(filter(None, os.environ.get(ENV_UNSERIALIZABLE, "").split(",")))
    if not bad:
        return results
    for i, rid in enumerate(row_ids):
        if str(rid) in bad:
            results[i] = Unserializable(str(rid))
    return results
