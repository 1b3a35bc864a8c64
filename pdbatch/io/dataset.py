"""Input side: find the Parquet files, check the columns, and cut the rows into work units.

A work unit is a row range inside one row group of one file. Its id is stable for the same
input (file order, row group, offset), which is what makes resume possible. Only Parquet
metadata is read while planning; rows are read unit by unit, so the driver's memory does not
grow with the input.
"""

from __future__ import annotations

import glob
import hashlib
import os
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import UserError

SAMPLING_COLUMNS = ("max_new_tokens", "temperature", "top_p", "top_k", "seed")
ROW_ID = "__pdbatch_id"


@dataclass(frozen=True)
class WorkUnit:
    unit_id: str
    path: str
    row_group: int
    start: int  # offset inside the row group
    num_rows: int
    file_row: int  # row index of the unit's first row in its file


@dataclass
class InputPlan:
    root: str
    files: list[str]
    units: list[WorkUnit]
    prompt_column: str | None
    messages_column: str | None
    id_column: str | None
    keep_columns: list[str]
    sampling_columns: list[str]

    @property
    def total_rows(self) -> int:
        return sum(u.num_rows for u in self.units)

    def fingerprint(self) -> str:
        """Identity of the input for resume: the files, their sizes and the unit layout."""
        h = hashlib.sha256()
        for f in self.files:
            h.update(f"{os.path.relpath(f, self.root)}:{os.path.getsize(f)}\n".encode())
        for u in self.units:
            h.update(f"{u.unit_id}:{u.num_rows}\n".encode())
        return h.hexdigest()[:16]

    def read_columns(self) -> list[str]:
        cols = [c for c in (self.prompt_column, self.messages_column, self.id_column) if c]
        return list(dict.fromkeys(cols + self.sampling_columns + self.keep_columns))


def find_files(input_path: str) -> tuple[str, list[str]]:
    """(root for relative ids, sorted Parquet files) for a file, directory or glob."""
    if any(ch in input_path for ch in "*?["):
        files = sorted(f for f in glob.glob(input_path, recursive=True) if os.path.isfile(f))
        root = os.path.dirname(input_path.split("*")[0].split("?")[0].split("[")[0]) or "."
        if not files:
            raise UserError(f"no files match {input_path}")
    elif os.path.isdir(input_path):
        root = input_path
        files = []
        for dirpath, dirnames, names in os.walk(input_path):
            # Hidden and _-prefixed entries are bookkeeping (as in Arrow, Spark and pdbatch's own output)
            dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
            files += [os.path.join(dirpath, n) for n in names if not n.startswith((".", "_"))]
        files.sort()
        if not files:
            raise UserError(f"no Parquet files in directory {input_path}")
    elif os.path.isfile(input_path):
        root, files = os.path.dirname(input_path) or ".", [input_path]
    else:
        raise UserError(f"input not found: {input_path}")
    return os.path.abspath(root), [os.path.abspath(f) for f in files]


def _open(path: str, in_dir: bool = False) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        hint = " (a directory input reads every file not starting with '_' or '.'; " \
               "move it out or give a glob such as DIR/*.parquet)" if in_dir else ""
        raise UserError(f"not a readable Parquet file: {path} ({str(e).splitlines()[0]}){hint}") from None


def _check_input_types(schema: pa.Schema, prompt: str | None, messages: str | None, path: str) -> None:
    """A column of the wrong kind fails every row alike: say so once, before any worker starts."""
    def base(name):
        t = schema.field(name).type
        return t.value_type if pa.types.is_dictionary(t) else t

    text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_null(t) \
        or getattr(pa.types, "is_string_view", lambda _: False)(t)  # noqa: E731
    listy = lambda t: pa.types.is_list(t) or pa.types.is_large_list(t) or pa.types.is_fixed_size_list(t)  # noqa: E731
    if prompt:
        t = base(prompt)
        if not (text(t) or pa.types.is_binary(t) or pa.types.is_large_binary(t)
                or (listy(t) and pa.types.is_integer(t.value_type))):
            raise UserError(f"prompt column {prompt!r} is {schema.field(prompt).type} in {path}; it must hold "
                            f"text (string or binary) or token ids (list of integers)")
    if messages:
        t = base(messages)
        if not (text(t) or listy(t)):
            raise UserError(f"messages column {messages!r} is {schema.field(messages).type} in {path}; it must "
                            f"hold lists of {{role, content}} or their JSON text")


def plan_input(input_path: str, *, prompt_column: str = "prompt", id_column: str | None = None,
               keep_columns: list[str] | tuple = (), unit_rows: int = 256) -> InputPlan:
    if unit_rows < 1:
        raise UserError(f"unit rows must be >= 1, got {unit_rows}")
    root, files = find_files(input_path)
    opened = [(f, _open(f, os.path.isdir(input_path))) for f in files]
    names0 = opened[0][1].schema_arrow.names
    # A `messages` column (chat) is used when the prompt column is absent, as documented.
    if prompt_column in names0:
        prompt, messages = prompt_column, None
    elif prompt_column == "prompt" and "messages" in names0:
        prompt, messages = None, "messages"
    else:
        have = ", ".join(names0) or "(none)"
        raise UserError(f"prompt column {prompt_column!r} not found in {files[0]} (columns: {have})")
    for col, what in [(id_column, "id column")] + [(c, "keep column") for c in keep_columns]:
        if col and col not in names0:
            raise UserError(f"{what} {col!r} not found in {files[0]}")
    _check_input_types(opened[0][1].schema_arrow, prompt, messages, files[0])
    sampling = [c for c in SAMPLING_COLUMNS if c in names0]
    needed = [c for c in (prompt, messages, id_column, *keep_columns, *sampling) if c]
    types0 = {c: opened[0][1].schema_arrow.field(c).type for c in needed}
    units: list[WorkUnit] = []
    for fi, (path, pf) in enumerate(opened):
        schema = pf.schema_arrow
        for c in needed:
            if c not in schema.names:
                raise UserError(f"column {c!r} missing in {path} (schema differs between input files)")
            if not _compatible(schema.field(c).type, types0[c]):
                raise UserError(f"column {c!r} is {schema.field(c).type} in {path} but "
                                f"{types0[c]} in {files[0]} (schema differs between input files)")
        file_row = 0
        md = pf.metadata
        for rg in range(md.num_row_groups):
            n = md.row_group(rg).num_rows
            for start in range(0, n, unit_rows):
                k = min(unit_rows, n - start)
                units.append(WorkUnit(f"{fi:05d}-{rg:05d}-{start:08d}", path, rg, start, k, file_row + start))
            file_row += n
    return InputPlan(root, files, units, prompt, messages, id_column, list(keep_columns), sampling)


def _compatible(a: pa.DataType, b: pa.DataType) -> bool:
    if a == b:
        return True
    base = lambda t: t.value_type if pa.types.is_dictionary(t) else t  # noqa: E731
    a, b = base(a), base(b)
    text = lambda t: pa.types.is_string(t) or pa.types.is_large_string(t)  # noqa: E731
    return a == b or (text(a) and text(b)) or (pa.types.is_integer(a) and pa.types.is_integer(b)) \
        or (pa.types.is_floating(a) and pa.types.is_floating(b))


def read_unit(plan: InputPlan, unit: WorkUnit) -> pa.Table:
    """The unit's rows (only the columns the job uses) plus a string id column `__pdbatch_id`."""
    pf = pq.ParquetFile(unit.path)
    table = pf.read_row_group(unit.row_group, columns=plan.read_columns())
    table = table.slice(unit.start, unit.num_rows)
    rel = os.path.relpath(unit.path, plan.root)
    ids = [f"{rel}:{unit.file_row + i}" for i in range(unit.num_rows)]
    if plan.id_column:  # a null user id falls back to the positional one: the row still runs
        ids = [p if v is None else str(v) for p, v in zip(ids, table.column(plan.id_column).to_pylist())]
    return table.append_column(ROW_ID, pa.array(ids, pa.string()))
