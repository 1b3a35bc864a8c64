"""The functions Dask runs for each work unit. Their keys are named `prefill-<unit>`,
`decode-<unit>`, `generate-<unit>` (colocated) and `write-<unit>`, so the dashboard's task
stream shows the phases in different colours.

The prefill result (KV packets) stays on the prefill worker until the decode task, placed on a
decode worker, needs it: Dask then moves it worker-to-worker over the cluster's comm (tcp, or
UCXX on GPU clusters).
"""

from __future__ import annotations

import math
import time

import pyarrow as pa
from distributed import get_worker, rejoin, secede

from ..engines.request import Request, SequenceOutput
from ..engines.sampling import SamplingParams, row_seed
from ..io.dataset import ROW_ID
from ..io.output import outputs_to_table, unit_summary, write_shard
from ..io.prompts import RowError, encode_prompt
from ..kv.packet import KVPacket, UnitPackets
from . import faults
from .early_decode import submit_unit, transfer_seconds
from .worker import current_engine, current_host


def build_requests(rows: pa.Table, columns: dict, defaults: SamplingParams, tokenizer,
                   worker: str | None, vocab_size: int | None = None
                   ) -> tuple[list[Request | None], list[SequenceOutput | None]]:
    """Per row: a Request, or a failed output saying what is wrong with the row. A prompt
    column of token ids (list<int>) is checked against `vocab_size`."""
    ids = rows.column(ROW_ID).to_pylist()
    prompts = rows.column(columns["prompt"]).to_pylist() if columns.get("prompt") else [None] * len(ids)
    messages = rows.column(columns["messages"]).to_pylist() if columns.get("messages") else None
    overrides = {c: rows.column(c).to_pylist() for c in columns.get("sampling", [])}
    reqs: list[Request | None] = []
    fails: list[SequenceOutput | None] = []
    now = time.time()
    for i, rid in enumerate(ids):
        try:
            params = _row_params(defaults, {c: v[i] for c, v in overrides.items()}, rid)
            prompt_ids = encode_prompt(tokenizer, prompts[i], messages[i] if messages else None, vocab_size)
        except RowError as e:
            reqs.append(None)
            fails.append(SequenceOutput.failed(rid, str(e), 0, worker))
            continue
        reqs.append(Request(rid, prompt_ids, params, arrival_time=now))
        fails.append(None)
    return reqs, fails


def _row_params(defaults: SamplingParams, row: dict, rid: str) -> SamplingParams:
    p = SamplingParams(**defaults.to_dict())
    for name, value in row.items():
        if value is None or (isinstance(value, float) and math.isnan(value)):
            continue  # a null cell means "use the job's default"
        if name in ("max_new_tokens", "top_k", "seed"):
            if isinstance(value, float) and not value.is_integer():
                raise RowError(f"{name} must be an integer, got {value!r}")
            try:
                value = int(value)
            except (TypeError, ValueError, OverflowError):
                raise RowError(f"{name} must be an integer, got {value!r}") from None
        elif name in ("temperature", "top_p"):
            try:
                value = float(value)
            except (TypeError, ValueError):
                raise RowError(f"{name} must be a number, got {value!r}") from None
        setattr(p, name, value)
    if "seed" not in row or row["seed"] is None:
        p.seed = row_seed(defaults.seed, rid)  # stable per row, independent of batching
    try:
        p.validate()
    except ValueError as e:
        raise RowError(str(e)) from None
    return p


def prefill_unit(rows: pa.Table, columns: dict, defaults: SamplingParams) -> UnitPackets:
    """KV packets (and rows already finished or failed), in row order. The result is checked to
    serialize here: a result that cannot travel fails this task (the driver retries the unit),
    rather than failing later inside Dask's worker-to-worker fetch, where nothing reports it."""
    engine = current_engine()
    reqs, fails = build_requests(rows, columns, defaults, engine.tokenizer, engine.worker_name,
                                 engine.vocab_size)
    results = engine.prefill([r for r in reqs if r is not None])
    it = iter(results)
    unit = UnitPackets(f if f is not None else next(it) for f in fails)
    unit = faults.inject_unserializable(unit, rows.column(ROW_ID).to_pylist())
    check_serializable(unit)
    return unit


def check_serializable(unit: UnitPackets) -> None:
    """Serialize `unit` the way a transfer will (cheap: packets become views of their KV, no
    copy; GPU packets take the "cuda" family, so nothing is staged to the host here)."""
    from distributed.protocol.serialize import serialize

    on_gpu = any(isinstance(p, KVPacket) and p.kv.device.type == "cuda" for p in unit)
    families = ("cuda", "dask", "pickle") if on_gpu else ("dask", "pickle")
    try:  # item by item, as UnitPackets' serializer does (it would turn a failure into a message)
        for item in unit:
            serialize(item, serializers=families, on_error="raise")
    except Exception as e:
        root = e  # the innermost cause says what broke; Dask's wrappers only say "could not serialize"
        while root.__cause__ or root.__context__:
            root = root.__cause__ or root.__context__
        raise RuntimeError(f"prefill result cannot be serialized: {type(root).__name__}: {root}") from e


def decode_unit(prefilled: list, prefill_key: str) -> list[SequenceOutput]:
    """Hand the unit's packets to this worker's long-lived decode engine, unless they went to it
    when this task turned ready (early_decode.py), and wait for them."""
    host, w = current_host(), get_worker()
    futs = host.early_decode.take(w.get_current_task())
    if futs is None:
        futs = submit_unit(host.engine, prefilled, transfer_seconds(w, prefill_key))
    secede()  # waiting is not work: free the thread slot while the engine decodes
    try:
        return [f.result() if not isinstance(f, SequenceOutput) else f for f in futs]
    finally:
        rejoin()


def generate_unit(rows: pa.Table, columns: dict, defaults: SamplingParams) -> list[SequenceOutput]:
    """Colocated mode: this worker's single engine does prefill and decode, interleaved."""
    engine = current_engine()
    reqs, fails = build_requests(rows, columns, defaults, engine.tokenizer, engine.worker_name,
                                 engine.vocab_size)
    futs = [engine.submit_request(r) if r is not None else f for r, f in zip(reqs, fails)]
    secede()
    try:
        return [f.result() if not isinstance(f, SequenceOutput) else f for f in futs]
    finally:
        rejoin()


def write_unit(outputs: list[SequenceOutput], keep: pa.Table | None, out_dir: str, unit_id: str) -> dict:
    """Write the unit's shard atomically; return the figures the driver aggregates."""
    table = outputs_to_table(outputs, keep)
    write_shard(out_dir, unit_id, table)
    return unit_summary(unit_id, outputs, str(get_worker().name))

