"""Tables and plots of score-vs-NFE sweeps, shared by benchmarks/digits_nfe.py and benchmarks/gmm_nfe.py.

Rows are flat dicts (solver, schedule, nfe, metric columns, ...) kept in a CSV that the sweeps append to one
row at a time, so an interrupted sweep keeps what it finished and a rerun only computes the missing rows.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402

SCHEDULE_STYLES = ["-o", "--s", "-.^", ":D", "-v", "--x"]


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """All rows of a sweep CSV ([] if the file does not exist)."""
    path = Path(path)
    if not path.is_file():
        return []
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def append_row(path: str | Path, row: dict, fields: Sequence[str]) -> None:
    """Append one row (header first if the file is new) in a single write, so parallel sweeps can share a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    line = ("" if not new else ",".join(fields) + "\n") + ",".join(_cell(row.get(k, "")) for k in fields) + "\n"
    with path.open("a") as f:
        f.write(line)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value).replace(",", ";")


def key(row: dict) -> tuple[str, str, int]:
    return row["solver"], row["schedule"], int(row["nfe"])


def value(row: dict, metric: str) -> float:
    text = row.get(metric, "")
    return float(text) if text not in ("", None) else math.nan


def pivot_markdown(rows: Sequence[dict], metric: str, solvers: Sequence[str], schedules: Sequence[str],
                   nfes: Sequence[int], fmt: str = "{:.3g}") -> str:
    """Markdown table, one line per (solver, schedule), one column per NFE; the best value per column in bold;
    '-' where the setting cannot run (e.g. heun at odd NFE) or did not run."""
    by_key = {key(r): r for r in rows}
    best = {}
    for n in nfes:
        vals = [value(by_key[(s, c, n)], metric) for s in solvers for c in schedules if (s, c, n) in by_key]
        vals = [v for v in vals if not math.isnan(v)]
        best[n] = min(vals) if vals else math.nan
    lines = ["| solver | schedule | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
             "|---|---|" + "---:|" * len(nfes)]
    for s in solvers:
        for c in schedules:
            cells = []
            for n in nfes:
                r = by_key.get((s, c, n))
                v = value(r, metric) if r is not None else math.nan
                cell = "-" if math.isnan(v) else fmt.format(v)
                cells.append(f"**{cell}**" if not math.isnan(v) and v == best[n] else cell)
            lines.append(f"| {s} | {c} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def winners_markdown(rows: Sequence[dict], metric: str, nfes: Sequence[int], fmt: str = "{:.3g}") -> str:
    """Per NFE: the best (solver, schedule), the runner-up, and the best of each solver."""
    lines = []
    for n in nfes:
        here = sorted((r for r in rows if int(r["nfe"]) == n and not math.isnan(value(r, metric))),
                      key=lambda r: value(r, metric))
        if not here:
            continue
        per_solver = {}
        for r in here:
            per_solver.setdefault(r["solver"], r)
        best = ", ".join(f"{s} {fmt.format(value(r, metric))} ({r['schedule']})" for s, r in per_solver.items())
        lines.append(f"- NFE {n}: best per solver, best first: {best}")
    return "\n".join(lines) + "\n"


def plot_panels(rows: Sequence[dict], panels: Sequence[tuple[str, str]], solvers: Sequence[str],
                schedules: Sequence[str], path: str | Path, title: str = "",
                lines: dict[str, Sequence[tuple[str, float, str | tuple]]] | None = None, ncols: int = 6) -> Path:
    """One panel per solver, at most `ncols` to a row, a block of rows per (metric, label); colour and marker =
    schedule; log-log axes, one y range per metric's block, one legend below the figure.

    `lines[metric]` adds horizontal reference lines (label, value, matplotlib style) to that metric's panels.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    per_metric = math.ceil(len(solvers) / ncols)
    ncols = math.ceil(len(solvers) / per_metric)
    fig, axes = plt.subplots(len(panels) * per_metric, ncols, figsize=(3.1 * ncols, 2.9 * len(panels) * per_metric),
                             squeeze=False)
    handles: dict[str, object] = {}
    for m, (metric, label) in enumerate(panels):
        block = axes[m * per_metric:(m + 1) * per_metric].flat
        block_axes = [ax for ax, _ in zip(block, solvers)]
        for ax in list(axes[m * per_metric:(m + 1) * per_metric].flat)[len(solvers):]:
            ax.set_visible(False)
        for ax, s in zip(block_axes, solvers):
            nfes = set()
            for i, c in enumerate(schedules):
                rs = sorted((r for r in rows if r["solver"] == s and r["schedule"] == c
                             and not math.isnan(value(r, metric))), key=lambda r: int(r["nfe"]))
                if not rs:
                    continue
                nfes.update(int(r["nfe"]) for r in rs)
                (h,) = ax.loglog([int(r["nfe"]) for r in rs], [value(r, metric) for r in rs],
                                 SCHEDULE_STYLES[i % len(SCHEDULE_STYLES)], color=f"C{i}", ms=3.5, lw=1.1)
                handles.setdefault(c, h)
            for text, v, style in (lines or {}).get(metric, ()):
                if not math.isnan(v):
                    handles.setdefault(text, ax.axhline(v, color="k", ls=style, lw=1.0))
            ax.set_xticks(sorted(nfes))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.tick_params(labelsize=7)
            ax.set_title(s, fontsize=9)
            ax.set_xlabel("NFE", fontsize=8)
            ax.grid(True, which="both", alpha=0.3)
        ys = [y for ax in block_axes for line in ax.get_lines() for y in line.get_ydata() if y > 0 and math.isfinite(y)]
        for ax in block_axes:
            if ys:
                ax.set_ylim(min(ys) / 1.3, max(ys) * 1.3)
        for ax in block_axes[::ncols]:
            ax.set_ylabel(label, fontsize=8)
    legend_cols = max(2, min(len(handles), ncols))
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=legend_cols, fontsize=8, frameon=False)
    if title:
        fig.suptitle(title, fontsize=10)
    height = fig.get_size_inches()[1]
    legend_height = 0.2 + 0.22 * math.ceil(len(handles) / legend_cols)  # inches
    fig.tight_layout(rect=(0, legend_height / height, 1, 1 - 0.35 / height if title else 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
