"""Validation metrics of a train.py run against images seen: one panel per metric family, from its CSV logs.

Reads `<run>/csv/metrics.csv` (older runs: every `<run>/csv/version_*/metrics.csv`), keeps the `val/*` columns and the
training loss, and plots them against `train/images_seen` (log-x). `--mark IMAGES=TEXT` adds a labelled vertical
line (e.g. where a checkpoint was exported, with its memorization rate). Writes the plot and a CSV of the
validation rows.

    python benchmarks/training_curve.py --run benchmarks/runs/digits_long --out docs/digits_training.png \
        --table benchmarks/results/digits_training.csv --mark 640000="640k: 0.0% near-copies"
"""

from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_logs(run: Path) -> list[dict[str, str]]:
    """All logged rows of the run's CSV logger, oldest first."""
    files = sorted((run / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name.split("_")[1]))
    files += [run / "csv" / "metrics.csv"] if (run / "csv" / "metrics.csv").is_file() else []
    if not files:
        raise SystemExit(f"no CSV logs under {run / 'csv'} (train with logger.kind=csv)")
    rows = []
    for f in files:
        with f.open(newline="") as fh:
            rows += list(csv.DictReader(fh))
    return rows


def series(rows: list[dict[str, str]], column: str) -> tuple[list[float], list[float]]:
    """(images seen, value) of the rows that logged `column`; images from the nearest earlier training row."""
    xs, ys, images = [], [], math.nan
    for r in rows:
        if r.get("train/images_seen"):
            images = float(r["train/images_seen"])
        if r.get(column):
            xs.append(images)
            ys.append(float(r[column]))
    return xs, ys


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, required=True, help="train.py run directory (logger.kind=csv)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    p.add_argument("--table", type=Path, help="CSV of the validation rows (default: beside --out)")
    p.add_argument("--mark", nargs="*", default=[], metavar="IMAGES=TEXT", help="labelled vertical lines")
    args = p.parse_args()
    rows = read_logs(args.run)
    columns = sorted({k for r in rows for k, v in r.items() if k.startswith("val/") and v})
    families = sorted({c.rsplit("/", 1)[0] for c in columns})
    fig, axes = plt.subplots(1, len(families) + 1, figsize=(6.5 * (len(families) + 1), 4.5), squeeze=False)
    for ax, family in zip(axes.flat, families):
        members = [c for c in columns if c.rsplit("/", 1)[0] == family]
        for c in members:
            ax.plot(*series(rows, c), "-o", ms=3, label=c.rsplit("/", 1)[-1])
        ax.set_title(family if len(members) > 1 else members[0])
    name = "train/loss_per_elem" if any(r.get("train/loss_per_elem") for r in rows) else "train/loss"  # older runs
    xs, ys = series(rows, name)
    window = max(1, len(ys) // 40)  # a running mean: the per-step loss is very noisy
    smooth = [sum(ys[max(0, i - window + 1): i + 1]) / len(ys[max(0, i - window + 1): i + 1]) for i in range(len(ys))]
    axes.flat[-1].plot(xs, smooth, label=f"{name} (mean of {window} logged steps)")
    axes.flat[-1].set_title("training loss")
    for ax in axes.flat:
        for mark in args.mark:
            at, _, text = mark.partition("=")
            ax.axvline(float(at), color="k", ls=":", lw=1)
            ax.annotate(text, (float(at), 1), xycoords=("data", "axes fraction"), rotation=90, va="top", ha="right",
                        fontsize=8)
        ax.set_xscale("log")
        ax.set_xlabel("training images seen")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(str(args.run))
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    table = args.table or args.out.with_suffix(".csv")
    with table.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["images_seen", *columns])
        points = {c: dict(zip(*series(rows, c))) for c in columns}
        for images in sorted({x for c in columns for x in points[c]}):
            w.writerow([int(images), *(f"{points[c][images]:.6g}" if images in points[c] else "" for c in columns)])
    print(f"wrote {args.out} and {table}")


if __name__ == "__main__":
    main()
