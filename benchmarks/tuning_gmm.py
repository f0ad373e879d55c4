"""Solver-tuned grids (`evodiff_pl.tuning.tune_sigmas`) on the exact 64-d Gaussian mixture, scored held out.

The tuner sees the starting noises of samples 0..T-1 (x_T = 80 * noise of seed j, `generate.initial_noise`) and
starts from the rescaled entropic grid of the mixture's exact MMSE (`EntropicSchedule.from_mmse`); every grid is
then scored on samples T..T+H-1, which the tuner never saw: median per-sample RMSE to the exact ODE endpoint
(`GaussianMixture.ode_solve`) and the Fréchet distance (FD) of fitted Gaussians to fresh data
(`metrics.frechet_distance`). Grids: karras, logsnr, rescaled_entropic (the start) and one tuned grid per
objective (`tuned_rmse`, `tuned_slack`, `tuned_fd`). `gap` = held-out / tuning-set median RMSE of the tuned grid.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/tuning_gmm.py | tee benchmarks/results/tuning_gmm.log
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.sampling.generate import initial_noise, steps_for_nfe
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.schedules import get_sigmas
from evodiff_pl.solvers import solve
from evodiff_pl.toy import GaussianMixture
from evodiff_pl.tuning import median_rmse, reference_solution, tune_sigmas

SOLVERS = ["dpmpp_2m", "unipc", "ipndm", "evodiff_consistent"]
OBJECTIVES = ["rmse", "slack", "fd"]
GRIDS = ["karras", "logsnr", "rescaled_entropic"] + [f"tuned_{o}" for o in OBJECTIVES]


def noise(first: int, count: int) -> torch.Tensor:
    return 80.0 * initial_noise(torch.arange(first, first + count), (64,), seed=0)[0].to(torch.float64)


def run(args: argparse.Namespace) -> None:
    gm = GaussianMixture.default()
    levels = torch.logspace(math.log10(0.002), math.log10(80.0), 129, dtype=torch.float64)
    m = gm.mmse(levels, n_mc=4096, generator=torch.Generator().manual_seed(2))
    sched = EntropicSchedule.from_mmse(levels, m, kind="rescaled_entropic", dim=gm.dim)
    tune_x, held_x = noise(0, args.tune), noise(args.tune, args.held_out)
    t0 = time.perf_counter()
    tune_ref = reference_solution(gm, tune_x, 80.0, 0.002)
    held_exact = gm.ode_solve(held_x, 80.0, 0.002, n_steps=2000)
    fresh = gaussian_fit(gm.sample(65536, generator=torch.Generator().manual_seed(1)))
    floor = frechet_distance(*gaussian_fit(held_exact), *fresh)
    print(f"tuning set: samples 0-{args.tune - 1}; held out: {args.tune}-{args.tune + args.held_out - 1}; "
          f"references {time.perf_counter() - t0:.1f} s; FD of the exact held-out ODE endpoints {floor:.4f}", flush=True)
    rows = []
    for solver in args.solvers:
        for n in args.nfe:
            steps = steps_for_nfe(solver, n)
            start = get_sigmas("rescaled_entropic", steps, schedule=sched)
            grids = {g: get_sigmas(g, steps) for g in ("karras", "logsnr")} | {"rescaled_entropic": start}
            seconds = {}
            for objective in OBJECTIVES:
                t0 = time.perf_counter()
                grids[f"tuned_{objective}"] = tune_sigmas(solver, gm, tune_x, start, reference=tune_ref,
                                                          objective=objective, nfe=n, max_evals=args.max_evals)
                seconds[f"tuned_{objective}"] = time.perf_counter() - t0
            for name, grid in grids.items():
                x = solve(solver, gm, held_x, grid)
                row = {"solver": solver, "nfe": n, "grid": name, "held": median_rmse(x, held_exact),
                       "tune": median_rmse(solve(solver, gm, tune_x, grid), tune_ref),
                       "fd": frechet_distance(*gaussian_fit(x), *fresh), "seconds": seconds.get(name, math.nan),
                       "levels": " ".join(f"{v:.3g}" for v in grid.tolist()[1:-1])}
                rows.append(row)
                print(f"{solver:<18} {n:>3} {name:<17} held {row['held']:.4f} tune {row['tune']:.4f} "
                      f"FD {row['fd']:.4f} {row['seconds']:6.1f} s  [{row['levels']}]", flush=True)
    write_markdown(rows, floor, args)


def write_markdown(rows: list[dict], floor: float, args: argparse.Namespace) -> None:
    by = {(r["solver"], r["nfe"], r["grid"]): r for r in rows}
    text = ["# Solver-tuned grids on the exact 64-d Gaussian mixture (held out)\n",
            f"Command: `{args.command}`\n",
            f"Tuned from the rescaled entropic grid (exact MMSE, 129 levels x 4096 draws) on the starting noises of "
            f"samples 0-{args.tune - 1} (reference: `reference_solution`, iPNDM 200 log-SNR steps), Nelder-Mead, "
            f"max {args.max_evals} solver runs; scored on samples {args.tune}-{args.tune + args.held_out - 1}. "
            f"Exact denoiser, float64, 1 thread. FD floor (exact ODE endpoints of the held-out set): {floor:.4f}.\n"]
    for metric, title in (("held", "held-out median per-sample RMSE to the exact ODE endpoint"),
                          ("fd", "held-out FD to 65536 fresh samples")):
        text += [f"## {title}\n", "| solver | NFE | " + " | ".join(GRIDS) + " | tuned_rmse / rescaled_entropic |",
                 "|---|---|" + "---|" * (len(GRIDS) + 1)]
        for solver in args.solvers:
            for n in args.nfe:
                vals = [by[(solver, n, g)][metric] for g in GRIDS]
                best = min(vals)
                cells = [f"**{v:.4g}**" if v == best else f"{v:.4g}" for v in vals]
                ratio = by[(solver, n, "tuned_rmse")][metric] / by[(solver, n, "rescaled_entropic")][metric]
                text.append(f"| {solver} | {n} | " + " | ".join(cells) + f" | {ratio:.2f} |")
        text.append("")
    text += ["## tuned grids: tuning-set vs held-out median RMSE, tuning time, interior levels\n",
             "| solver | NFE | objective | tuning set | held out | gap (held / tune) | seconds | interior σ |",
             "|---|---|---|---|---|---|---|---|"]
    for solver in args.solvers:
        for n in args.nfe:
            for o in OBJECTIVES:
                r = by[(solver, n, f"tuned_{o}")]
                text.append(f"| {solver} | {n} | {o} | {r['tune']:.4g} | {r['held']:.4g} | {r['held'] / r['tune']:.2f} "
                            f"| {r['seconds']:.1f} | {r['levels']} |")
    Path(args.out).write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--solvers", nargs="+", default=SOLVERS)
    p.add_argument("--nfe", type=int, nargs="+", default=[4, 5, 6, 8, 10])
    p.add_argument("--tune", type=int, default=64, help="starting noises the tuner sees")
    p.add_argument("--held-out", type=int, default=1024, help="starting noises scored (disjoint seeds)")
    p.add_argument("--max-evals", type=int, default=400)
    p.add_argument("--out", default="benchmarks/results/tuning_gmm.md")
    args = p.parse_args()
    args.command = "OMP_NUM_THREADS=1 PYTHONPATH=. python " + " ".join(sys.argv)
    torch.set_num_threads(1)
    run(args)


if __name__ == "__main__":
    main()
