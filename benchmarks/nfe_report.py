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

SOLVER_COLORS = {"euler": "C0", "heun": "C1", "dpmpp_2m": "C2", "dpmpp_3m": "C3", "evodiff": "C4", "unipc": "C5",
                 "ipndm": "C6", "edm_stochastic": "C7", "dpmpp_2m_sde": "C8"}
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
                lines: dict[str, Sequence[tuple[str, float, str | tuple]]] | None = None, ncols: int | None = None) -> Path:
    """One panel per (metric, label); colour = solver, line style = schedule; log-log axes.

    `lines[metric]` adds horizontal reference lines (label, value, matplotlib style) to that panel.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    ncols = ncols or len(panels)
    nrows = math.ceil(len(panels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(7.5 * ncols, 6.0 * nrows), squeeze=False)
    for ax, (metric, label) in zip(axes.flat, panels):
        nfes = set()
        for s in solvers:
            for i, c in enumerate(schedules):
                rs = sorted((r for r in rows if r["solver"] == s and r["schedule"] == c
                             and not math.isnan(value(r, metric))), key=lambda r: int(r["nfe"]))
                if not rs:
                    continue
                nfes.update(int(r["nfe"]) for r in rs)
                ax.loglog([int(r["nfe"]) for r in rs], [value(r, metric) for r in rs],
                          SCHEDULE_STYLES[i % len(SCHEDULE_STYLES)], color=SOLVER_COLORS.get(s, "k"),
                          ms=3.5, lw=1.1, label=f"{s} / {c}")
        for text, v, style in (lines or {}).get(metric, ()):
            if not math.isnan(v):
                ax.axhline(v, color="k", ls=style, lw=1.0, label=text)
        ax.set_xticks(sorted(nfes))
        ax.xaxis.set_major_formatter(ScalarFormatter())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("NFE (denoiser calls per sample)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0, -1].legend(fontsize=6.5, ncol=2, loc="best")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
