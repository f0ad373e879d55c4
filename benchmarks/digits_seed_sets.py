"""How much a digits score moves with the seeds: each setting scored on S disjoint held-out seed sets of 1,797
samples (set k = seeds 1797k .. 1797(k+1)-1) and on all of them pooled, with its ratio to the heun/karras NFE 80
reference on the same seeds.

`benchmarks/digits_tuned.py` scores every grid on seeds 0-1796 only; pixel FD against the 1,797 digits moves by
hundreds from one seed set to the next (and the reference with it), so a gap to the reference measured on one set is
uncertain by several per cent. Settings: `solver:grid:nfe`, grid = karras, logsnr, rescaled_entropic (the model's
learned grid, from the dedicated pass beside the checkpoint, as digits_tuned.py), `tuned` (the tuned_fd grid of
that model, solver and NFE in --tuned-rows) or `tuned_<objective>` (that column of --tuned-rows). Rows are appended to --rows; a rerun skips the rows already there.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/digits_seed_sets.py --model 640k \
        --settings unipc:tuned:5 unipc:rescaled_entropic:5 --tuned-rows benchmarks/results/digits_tuned_long.csv
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from digits_tuned import MODELS  # noqa: E402
from nfe_report import append_row, read_rows  # noqa: E402

from evodiff_pl.evaluation.metrics import FrechetScore  # noqa: E402
from evodiff_pl.io.denoiser import load_denoiser  # noqa: E402
from evodiff_pl.sampling.estimate import estimated_schedule_path  # noqa: E402
from evodiff_pl.sampling.generate import generate, steps_for_nfe  # noqa: E402
from evodiff_pl.sampling.job import checkpoint_data  # noqa: E402
from evodiff_pl.schedules.entropic import EntropicSchedule  # noqa: E402
from evodiff_pl.schedules.grids import get_sigmas  # noqa: E402

SET = 1797
REFERENCE = "heun:karras:80"
FIELDS = ["model", "setting", "seed_set", "fd_pixels", "levels"]


def grid(setting: str, model: str, schedule: EntropicSchedule, tuned_rows: list[dict]) -> tuple[str, int, torch.Tensor]:
    solver, name, nfe = setting.split(":")
    if not name.startswith("tuned"):
        options = {"schedule": schedule} if "entropic" in name else {}
        return solver, int(nfe), get_sigmas(name, steps_for_nfe(solver, int(nfe)), **options)
    column = "tuned_fd" if name == "tuned" else name  # tuned: the tuned_fd grid; tuned_<objective>: that one
    rows = [r for r in tuned_rows if (r["model"], r["solver"], r["nfe"], r["grid"]) == (model, solver, nfe, column)]
    if not rows:
        raise SystemExit(f"no {column} grid of {model} {solver} NFE {nfe} in --tuned-rows")
    return solver, int(nfe), torch.tensor([float(v) for v in rows[-1]["levels"].split()], dtype=torch.float64)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="640k", choices=list(MODELS))
    p.add_argument("--settings", nargs="+", default=["unipc:tuned:5", "unipc:rescaled_entropic:5"])
    p.add_argument("--sets", type=int, default=5, help="disjoint seed sets of 1,797 samples")
    p.add_argument("--tuned-rows", nargs="+", default=["benchmarks/results/digits_tuned_long.csv"])
    p.add_argument("--rows", default="benchmarks/results/digits_seed_sets.csv")
    p.add_argument("--out", default="benchmarks/results/digits_seed_sets.md")
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load_denoiser(MODELS[args.model])
    meta = loaded.meta
    shape = tuple(meta["sample_shape"])
    schedule = EntropicSchedule.load(estimated_schedule_path(Path(MODELS[args.model])))
    data = checkpoint_data(loaded)
    scores = {n: FrechetScore("pixels", num_samples=n * SET, shape=shape) for n in (1, args.sets)}
    for score in scores.values():
        score.prepare_real(data)
    tuned_rows = [r for path in args.tuned_rows for r in read_rows(path)]
    done = {(r["model"], r["setting"], r["seed_set"]) for r in read_rows(args.rows)}
    settings = [REFERENCE, *[s for s in args.settings if s != REFERENCE]]
    for setting in settings:
        solver, _, sigmas = grid(setting, args.model, schedule, tuned_rows)
        if all((args.model, setting, k) in done for k in [*map(str, range(args.sets)), "pooled"]):
            continue
        samples = []
        for k in range(args.sets):
            x = generate(loaded.denoiser, torch.arange(SET) + SET * k, shape, solver=solver, sigmas=sigmas, seed=0,
                         batch_size=SET)
            samples.append(x)
            scores[1].reset()
            scores[1].update(x)
            row = {"model": args.model, "setting": setting, "seed_set": k, "fd_pixels": scores[1].compute(),
                   "levels": " ".join(f"{v:.4g}" for v in sigmas.tolist())}
            append_row(args.rows, row, FIELDS)
            print(f"{setting:28s} seeds {SET * k}-{SET * (k + 1) - 1}: fd_pixels {row['fd_pixels']:.1f}", flush=True)
        scores[args.sets].reset()
        scores[args.sets].update(torch.cat(samples))
        append_row(args.rows, {"model": args.model, "setting": setting, "seed_set": "pooled",
                               "fd_pixels": scores[args.sets].compute(), "levels": row["levels"]}, FIELDS)
    scored = [r["setting"] for r in read_rows(args.rows) if r["model"] == args.model]
    report(args, list(dict.fromkeys([REFERENCE, *scored])))  # every setting scored so far, in order


def report(args: argparse.Namespace, settings: list[str]) -> None:
    by = {(r["setting"], r["seed_set"]): float(r["fd_pixels"]) for r in read_rows(args.rows) if r["model"] == args.model}
    sets = [*map(str, range(args.sets)), "pooled"]
    head = [f"seeds {SET * int(k)}-{SET * (int(k) + 1) - 1}" if k != "pooled" else
            f"pooled ({args.sets * SET} samples)" for k in sets]
    text = [f"# Digits {args.model}: scores on disjoint seed sets\n",
            "Command: `OMP_NUM_THREADS=1 PYTHONPATH=. python " + " ".join(sys.argv) + "`\n",
            f"fd_pixels against the 1,797 digits; each cell: the score, and in brackets its ratio to {REFERENCE} on "
            "the same seeds. Tuned grids from " + ", ".join(args.tuned_rows) + " (tuned on seeds TUNE_SEED + j, never "
            "scored).\n", "| setting | " + " | ".join(head) + " | mean ratio of the sets |", "|---|" + "---|" * (len(sets) + 1)]
    for setting in settings:
        cells, ratios = [], []
        for k in sets:
            v, ref = by.get((setting, k), math.nan), by.get((REFERENCE, k), math.nan)
            cells.append(f"{v:.0f} ({v / ref:.3f})" if not math.isnan(v) else "-")
            if k != "pooled" and not math.isnan(v):
                ratios.append(v / ref)
        mean = f"{sum(ratios) / len(ratios):.3f}" if ratios else "-"
        text.append(f"| {setting} | " + " | ".join(cells) + f" | {mean} |")
    Path(args.out).write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
