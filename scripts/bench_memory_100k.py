"""Memory flatness over a large input: does the driver or a worker grow with the rows done?

    python scripts/bench_memory_100k.py [--rows 100000] [--unit-rows 5000] [--max-new-tokens 2]
        [--out /tmp/pdbatch-mem100k] [-- extra pdbatch run options]

Writes ROWS tiny prompts to a Parquet file, runs the real `pdbatch run` on the embedded cluster
(prefill + decode worker processes), and samples the RSS of every process of the run (psutil,
twice a second) together with the number of units done. Prints, per process, the RSS when 10%,
50% and 100% of the units were done and the peak, and writes everything to OUT/memory.json.
"Flat" means the 10% -> 100% growth is small against the process's size and does not scale with
the rows: rerun with --rows 200000 to see whether it doubles.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow as pa
import pyarrow.parquet as pq

REPO = Path(__file__).resolve().parent.parent


def session(sid: int) -> list[psutil.Process]:
    out = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == sid:
                out.append(p)
        except (OSError, psutil.Error):
            pass
    return out


def role(p: psutil.Process, driver: int) -> str:
    if p.pid == driver:
        return "driver"
    try:
        cmd = " ".join(p.cmdline())
    except psutil.Error:
        return "?"
    return "resource_tracker" if "resource_tracker" in cmd else f"worker pid {p.pid}"


def units_done(out: Path) -> int:
    m = out / "_pdbatch" / "manifest.jsonl"
    return len(m.read_text().splitlines()) if m.exists() else 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--unit-rows", type=int, default=5000)
    ap.add_argument("--max-new-tokens", type=int, default=2)
    ap.add_argument("--out", default="/tmp/pdbatch-mem100k")
    ap.add_argument("extra", nargs="*", help="more `pdbatch run` options (after --)")
    a = ap.parse_args()
    work = Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    inp = work / "in.parquet"
    pq.write_table(pa.table({"prompt": [f"q{i} hi" for i in range(a.rows)]}), inp, row_group_size=25_000)
    out = work / "out"
    shutil.rmtree(out, ignore_errors=True)  # an old manifest would be read as this run's progress
    cmd = [sys.executable, "-m", "pdbatch.cli", "run", str(inp), "-o", str(out), "--overwrite",
           "--max-new-tokens", str(a.max_new_tokens), "--ignore-eos", "--unit-rows", str(a.unit_rows),
           "--progress", "none", *a.extra]
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    samples = []  # (seconds, units done, {pid: rss})
    names: dict[int, str] = {}
    while proc.poll() is None:
        rss = {}
        for p in session(proc.pid):
            try:
                rss[p.pid] = p.memory_info().rss
                names.setdefault(p.pid, role(p, proc.pid))
            except psutil.Error:
                pass
        samples.append((time.time() - t0, units_done(out), rss))
        time.sleep(0.5)
    err = proc.stderr.read()
    if proc.returncode != 0:
        sys.exit(f"pdbatch run failed ({proc.returncode}):\n{err}")
    report = json.loads((out / "_pdbatch" / "report.json").read_text())
    for name, mem in report.get("worker_memory", {}).items():  # name the worker processes
        if mem.get("pid") in names:
            names[mem["pid"]] = name
    total = max(s[1] for s in samples)

    def at(frac: float, pid: int):
        hits = [s[2][pid] for s in samples if s[1] >= frac * total and pid in s[2]]
        return hits[0] if hits else None

    rows = []
    for pid, name in sorted(names.items(), key=lambda kv: kv[1]):
        if name == "resource_tracker":
            continue
        r = {"process": name, "pid": pid, "peak_mib": max(s[2].get(pid, 0) for s in samples) / 2**20}
        for frac in (0.1, 0.5, 1.0):
            v = at(frac, pid)
            r[f"rss_at_{int(frac * 100)}pct_mib"] = None if v is None else v / 2**20
        rows.append(r)
    result = {"rows": a.rows, "unit_rows": a.unit_rows, "units": total, "max_new_tokens": a.max_new_tokens,
              "wall_s": round(time.time() - t0, 1), "rows_per_s": round(a.rows / report["wall_s"], 1),
              "processes": rows, "report_worker_memory": report.get("worker_memory"),
              "timeline": [(round(t, 1), u, {names.get(p, p): v // 2**20 for p, v in m.items()})
                           for t, u, m in samples]}
    (work / "memory.json").write_text(json.dumps(result, indent=1))
    print(f"{a.rows} rows in {total} units, {result['wall_s']} s wall, {result['rows_per_s']} rows/s (pipeline)")
    print(f"{'process':<12} {'@10% MiB':>9} {'@50% MiB':>9} {'@100% MiB':>10} {'peak MiB':>9} {'10->100%':>9}")
    for r in rows:
        lo, hi = r["rss_at_10pct_mib"], r["rss_at_100pct_mib"]
        grow = f"{hi - lo:+.1f}" if lo is not None and hi is not None else "-"
        fmt = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
        print(f"{r['process']:<12} {fmt(lo):>9} {fmt(r['rss_at_50pct_mib']):>9} {fmt(hi):>10} "
              f"{r['peak_mib']:>9.1f} {grow:>9}")
    print(f"details: {work / 'memory.json'}")


if __name__ == "__main__":
    main()
