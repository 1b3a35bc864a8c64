"""PNG plots of a `pdbatch bench` result (the bench.json dict): throughput bars, TTFT and TPOT
CDFs, and a timeline of what every pdbatch worker was doing."""

from __future__ import annotations

import os

COLORS = {"prefill": "tab:blue", "decode": "tab:orange", "generate": "tab:purple",
          "transfer": "tab:red", "write": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def write_plots(result: dict, out_dir: str) -> list[str]:
    systems = result["systems"]
    title = f"{result['workload']['name']}, {result['workload']['rows']} rows, {result['model']['name']}"
    files = [_throughput(systems, title, os.path.join(out_dir, "throughput.png")),
             _cdf(systems, "ttft_s", "TTFT (s, from the start of the run)", title,
                  os.path.join(out_dir, "ttft_cdf.png")),
             _cdf(systems, "tpot_s", "TPOT (ms per output token)", title,
                  os.path.join(out_dir, "tpot_cdf.png"), scale=1000.0)]
    runs = {n: s for n, s in systems.items() if s.get("timeline")}
    if runs:
        files.append(_timeline(runs, title, os.path.join(out_dir, "timeline.png")))
    return files


def _throughput(systems: dict, title: str, path: str) -> str:
    plt = _plt()
    names = list(systems)
    values = [systems[n]["output_tokens_per_s"] for n in names]
    fig, ax = plt.subplots(figsize=(7, 4))
    bars = ax.bar(names, values, color=["tab:blue", "tab:green", "tab:gray", "tab:olive"][:len(names)])
    for b, v in zip(bars, values):
        ax.annotate(f"{v:.0f}", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom")
    ax.set_ylabel("output tokens / s")
    ax.set_title(f"Throughput: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _cdf(systems: dict, key: str, label: str, title: str, path: str, scale: float = 1.0) -> str:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, s in systems.items():
        v = sorted(x * scale for x in s["per_row"][key] if x is not None)
        if v:
            ax.step(v, [(i + 1) / len(v) for i in range(len(v))], where="post", label=name)
    values = [x for s in systems.values() for x in s["per_row"][key] if x]
    if values and max(values) > 50 * min(values):  # systems orders of magnitude apart
        ax.set_xscale("log")
        label += ", log scale"
    ax.set_xlabel(label)
    ax.set_ylabel("fraction of rows")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{label.split(' (')[0]} CDF: {title}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def merge(spans: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Union of intervals (decode tasks of one worker overlap: they share one engine)."""
    out: list = []
    for a, b in sorted(spans):
        if out and a <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], b))
        else:
            out.append((a, b))
    return out


def role_spans(run: dict, worker: str) -> list[tuple[str, float, float]]:
    """(role, start, stop) of a worker over a disaggregated run, from its first role and the
    driver's switches (bench.json `roles`, `role_switches`; seconds from the run's start)."""
    roles = run.get("roles") or {}
    role = (roles.get("initial") or {}).get(worker)
    if role is None:
        return []
    spans, t = [], 0.0
    for s in sorted((s for s in run.get("role_switches") or [] if s["worker"] == worker), key=lambda s: s["t_s"]):
        at = max(0.0, s["t_s"])
        if at > t:
            spans.append((role, t, at))
        role, t = s["to"], at
    spans.append((role, t, max(t, run["wall_s"])))
    return spans


def _timeline(runs: dict, title: str, path: str) -> str:
    plt = _plt()
    from matplotlib.patches import Patch

    fig, axes = plt.subplots(len(runs), 1, figsize=(9, 1.2 + 1.1 * sum(
        len({s[0] for s in r["timeline"]}) for r in runs.values())), squeeze=False)
    used = set()
    for ax, (name, run) in zip(axes[:, 0], runs.items()):
        workers = sorted({s[0] for s in run["timeline"]})
        for y, w in enumerate(workers):
            for kind in COLORS:
                spans = merge([(a, b) for ww, k, a, b in run["timeline"] if ww == w and k == kind])
                if spans:
                    used.add(kind)
                    # transfers and writes are thin bars in the middle of the lane
                    h, off = (0.3, 0.35) if kind in ("transfer", "write") else (0.8, 0.1)
                    ax.broken_barh([(a, b - a) for a, b in spans], (y + off, h), color=COLORS[kind])
            # the driver's role (rebalancing): a band along the bottom of the lane, a tick per switch
            for role, a, b in role_spans(run, w):
                used.add(role)
                ax.broken_barh([(a, b - a)], (y + 0.0, 0.08), color=COLORS[role], alpha=0.6)
                if a > 0:
                    ax.plot([a, a], [y, y + 0.9], color="black", lw=0.6, ls=":")
            busy = run["workers"].get(w, {})
            note = ", ".join(f"{k.split('_')[0]} busy {busy[k]:.1f}s" for k in ("prefill_busy_s", "decode_busy_s")
                             if busy.get(k))
            ax.annotate(note, (1.0, y + 0.5), xycoords=("axes fraction", "data"), xytext=(4, 0),
                        textcoords="offset points", va="center", fontsize=7)
        ax.set_yticks([y + 0.5 for y in range(len(workers))], workers)
        ax.set_xlim(0, run["wall_s"])
        ax.set_ylim(0, len(workers))
        what = "every worker prefills and decodes" if name == "colocated" else "prefill and decode workers"
        if run.get("roles"):
            what += (f"; band: the driver's role, {run['roles'].get('switches', 0)} switches (dotted)"
                     if run["roles"].get("rebalance") else "; fixed roles")
        ax.set_title(f"{name} ({what}; {run['wall_s']:.1f} s)", fontsize=9)
    axes[-1, 0].set_xlabel("seconds from the start of the run")
    fig.legend(handles=[Patch(color=COLORS[k], label=k) for k in COLORS if k in used],
               loc="lower center", fontsize=8, ncol=max(1, len(used)), frameon=False)
    fig.suptitle(f"Worker timeline (task stream): {title}", fontsize=10, x=0.02, ha="left")
    fig.tight_layout(rect=(0, 0.06, 0.86, 0.97))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
