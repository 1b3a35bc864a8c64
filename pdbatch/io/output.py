"""Output side: Parquet shards written atomically, the manifest of finished units, resume.

Layout of OUT:
    part-<unit>.parquet      one shard per work unit (readable with pyarrow.dataset)
    _pdbatch/job.json        the input fingerprint and the options that change results
    _pdbatch/manifest.jsonl  one line per finished unit (appended by the driver only)
    _pdbatch/report.json     the run's summary
    _SUCCESS                 only when every row is written

A shard is written to a hidden temp name and renamed, and a unit counts as done only when the
manifest says so AND its shard exists with the right row count; a crash at any point leaves
either a finished unit or nothing that a reader (or a resume) would take for data.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid

import pyarrow as pa
import pyarrow.parquet as pq

from ..engines.request import SequenceOutput
from ..errors import UserError

META_DIR = "_pdbatch"
SUCCESS = "_SUCCESS"

OUTPUT_SCHEMA = pa.schema([
    ("id", pa.string()),
    ("generated_text", pa.string()),
    ("output_token_ids", pa.list_(pa.int32())),
    ("num_prompt_tokens", pa.int32()),
    ("num_generated_tokens", pa.int32()),
    ("finish_reason", pa.string()),
    ("ttft_s", pa.float64()),
    ("tpot_s", pa.float64()),
    ("prefill_worker", pa.string()),
    ("decode_worker", pa.string()),
    ("error", pa.string()),
])


def outputs_to_table(outputs: list[SequenceOutput], keep: pa.Table | None = None) -> pa.Table:
    cols = {
        "id": [o.id for o in outputs],
        "generated_text": [o.generated_text for o in outputs],
        "output_token_ids": [o.output_token_ids if o.error is None else None for o in outputs],
        "num_prompt_tokens": [o.num_prompt_tokens for o in outputs],
        "num_generated_tokens": [o.num_generated_tokens for o in outputs],
        "finish_reason": [o.finish_reason for o in outputs],
        "ttft_s": [o.ttft_s for o in outputs],
        "tpot_s": [o.tpot_s for o in outputs],
        "prefill_worker": [o.prefill_worker for o in outputs],
        "decode_worker": [o.decode_worker for o in outputs],
        "error": [o.error for o in outputs],
    }
    table = pa.table(cols, schema=OUTPUT_SCHEMA)
    if keep is not None:
        for name in keep.column_names:
            if name in table.column_names:  # never shadow a result column
                raise UserError(f"--keep-columns {name!r} clashes with an output column")
            table = table.append_column(name, keep.column(name))
    return table


def unit_summary(unit_id: str, outputs: list[SequenceOutput], writer: str) -> dict:
    """The unit's manifest entry: the figures the driver aggregates into the report."""
    ok = [o for o in outputs if o.error is None]
    return {
        "unit": unit_id, "rows": len(outputs), "errors": len(outputs) - len(ok),
        "prompt_tokens": sum(o.num_prompt_tokens for o in outputs),
        "output_tokens": sum(o.num_generated_tokens for o in ok),
        "ttft_s": [o.ttft_s for o in ok if o.ttft_s is not None],
        "tpot_s": [o.tpot_s for o in ok if o.tpot_s is not None],
        "kv_bytes": sum(o.kv_bytes for o in ok if o.prefill_worker != o.decode_worker),
        "kv_transfer_s": max((o.kv_transfer_s or 0.0 for o in ok), default=0.0),
        "rows_by_decode_worker": _count(o.decode_worker for o in ok),
        "rows_by_prefill_worker": _count(o.prefill_worker for o in ok),
        "writer": writer,
    }


def _count(values) -> dict:
    out: dict = {}
    for v in values:
        if v is not None:
            out[str(v)] = out.get(str(v), 0) + 1
    return out


def shard_name(unit_id: str) -> str:
    return f"part-{unit_id}.parquet"


def write_shard(out_dir: str, unit_id: str, table: pa.Table) -> str:
    final = os.path.join(out_dir, shard_name(unit_id))
    tmp = os.path.join(out_dir, f".tmp-{unit_id}-{uuid.uuid4().hex[:8]}.parquet")
    pq.write_table(table, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, final)  # atomic on POSIX: readers see the old state or the whole shard
    _fsync_dir(out_dir)  # the rename itself survives a power cut before the manifest says done
    return final


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems refuse fsync on a directory; the rename still happened
        pass
    finally:
        os.close(fd)


class OutputDir:
    def __init__(self, path: str):
        self.path = path
        self.meta = os.path.join(path, META_DIR)
        self.manifest = os.path.join(self.meta, "manifest.jsonl")

    def stored_job(self) -> dict | None:
        """The job options of the run this directory holds (its `_pdbatch/job.json`), or None."""
        try:
            with open(os.path.join(self.meta, "job.json")) as f:
                job = json.load(f)
        except (OSError, ValueError):
            return None
        return job if isinstance(job, dict) else None

    def prepare(self, job: dict, overwrite: bool) -> dict[str, dict]:
        """Create or reopen OUT; returns the ids of units already finished (resume)."""
        if overwrite and os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise UserError(f"output path exists and is not a directory: {self.path}")
            shutil.rmtree(self.path)
        if os.path.exists(self.path):
            if not os.path.isdir(self.path):
                raise UserError(f"output path exists and is not a directory: {self.path}")
            # `_pdbatch/` alone is ours even before a first run: `pdbatch submit` writes the
            # sbatch script, the Slurm log and the scheduler file there before the driver starts
            entries = [e for e in os.listdir(self.path) if e != META_DIR]
            job_file = os.path.join(self.meta, "job.json")
            if entries and not os.path.isfile(job_file):
                raise UserError(f"output directory {self.path} is not empty and holds no pdbatch run; "
                                f"use --overwrite to replace it")
            old = self.stored_job() if os.path.isfile(job_file) else None
            if old is not None:
                if old != job:
                    diff = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
                    raise UserError(f"output directory {self.path} holds a run with different "
                                    f"{', '.join(diff)}; use --overwrite to replace it")
        os.makedirs(self.meta, exist_ok=True)
        self._clean_temp()
        done = self.done_units()
        self._compact_manifest(done)
        with open(os.path.join(self.meta, "job.json"), "w") as f:
            json.dump(job, f, indent=1, sort_keys=True)
        return done

    def _clean_temp(self) -> None:
        for name in os.listdir(self.path):  # leftovers of a crash mid-write: never data
            if name.startswith(".tmp-"):
                os.remove(os.path.join(self.path, name))

    def _manifest_entries(self) -> tuple[list[dict], bool]:
        """The whole, well-formed entries, and whether the file holds anything else."""
        entries, junk = [], False
        with open(self.manifest, "rb") as f:
            data = f.read()
        for line in data.split(b"\n"):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:  # a torn last line from a killed driver (or bytes that are not UTF-8)
                junk = True
                continue
            if isinstance(entry, dict) and isinstance(entry.get("unit"), str) and isinstance(entry.get("rows"), int):
                entries.append(entry)
            else:
                junk = True
        return entries, junk or not data.endswith(b"\n") and bool(data)

    def _compact_manifest(self, done: dict[str, dict]) -> None:
        """Keep exactly the entries of the units that count as done, once each. A torn last line
        must go before anything is appended (the next entry would be glued to it and lost), and
        the entry of a unit whose shard is gone or truncated goes too, so that once the unit is
        redone the manifest names it once."""
        if not os.path.exists(self.manifest):
            return
        entries, junk = self._manifest_entries()
        if not junk and entries == list(done.values()):
            return
        tmp = self.manifest + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(json.dumps(e, sort_keys=True) + "\n" for e in done.values())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.manifest)

    def done_units(self) -> dict[str, dict]:
        done: dict[str, dict] = {}
        if not os.path.exists(self.manifest):
            return done
        for entry in self._manifest_entries()[0]:
            shard = os.path.join(self.path, shard_name(entry["unit"]))
            if os.path.isfile(shard) and _rows(shard) == entry["rows"]:  # a truncated shard is redone
                done[entry["unit"]] = entry
        return done

    def record(self, entry: dict) -> None:
        with open(self.manifest, "a") as f:
            f.write(json.dumps(entry, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def remove_strays(self, expected_units: set[str]) -> None:
        """Shards of units not in the manifest (written, then the driver died) are redone."""
        for name in os.listdir(self.path):
            if name.startswith("part-") and name.endswith(".parquet"):
                if name[len("part-"):-len(".parquet")] not in expected_units:
                    os.remove(os.path.join(self.path, name))

    def write_report(self, report: dict) -> None:
        with open(os.path.join(self.meta, "report.json"), "w") as f:
            json.dump(report, f, indent=1, sort_keys=True)

    def mark_success(self) -> None:
        open(os.path.join(self.path, SUCCESS), "w").close()

    def clear_success(self) -> None:
        p = os.path.join(self.path, SUCCESS)
        if os.path.exists(p):
            os.remove(p)


def _rows(path: str) -> int:
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except Exception:  # truncated or foreign file: not a finished shard
        return -1
