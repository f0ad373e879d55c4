"""Solver-tuned grids (`evodiff_pl.tuning.tune_sigmas`) on the digits models, scored on seeds the tuner never saw.

For each model, solver and NFE: the tuner starts from the model's learned rescaled entropic grid (the dedicated
pass beside the checkpoint, `<ckpt stem>_schedule_estimated.json`) and sees the starting noises of the tuning
set, sample j drawn from seed TUNE_SEED + j (`evodiff_pl.sampling.grid_tuning.TUNE_SEED`, far above the scoring
seeds), with reference endpoints from `reference_solution` (iPNDM, 200 log-SNR steps). Every grid is then scored
as `sample.py score=fd_pixels` does (seeds 0..1796, pixel FD against the 1,797 digits, `fd_pixels`). The
tuning-set vs held-out gap: `fd_tune` = FD of the T tuning-set samples, `fd_held` = FD of T held-out samples
(seeds 0..T-1), both against all digits, so their finite-sample bias is the same. Rows are appended to --rows;
a rerun skips the rows already there. Also the reference heun/karras at NFE 80 in the same pipeline.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/digits_tuned.py --models 640k --solvers dpmpp_2m unipc \
        --nfe 5 --objectives rmse slack fd          # choose the objective
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/digits_tuned.py --objectives fd   # the full grid
    PYTHONPATH=. python benchmarks/digits_tuned.py --report-only
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from nfe_report import append_row, read_rows  # noqa: E402

from evodiff_pl.evaluation.metrics import FrechetScore  # noqa: E402
from evodiff_pl.io.denoiser import load_denoiser  # noqa: E402
from evodiff_pl.sampling.estimate import estimated_schedule_path  # noqa: E402
from evodiff_pl.sampling.generate import generate, initial_noise, steps_for_nfe  # noqa: E402
from evodiff_pl.sampling.job import checkpoint_data  # noqa: E402
from evodiff_pl.schedules.entropic import EntropicSchedule  # noqa: E402
from evodiff_pl.schedules.grids import get_sigmas  # noqa: E402
from evodiff_pl.sampling.grid_tuning import TUNE_SEED  # noqa: E402
from evodiff_pl.tuning import OBJECTIVES, reference_solution, tune_sigmas  # noqa: E402

MODELS = {"640k": "benchmarks/results/digits_640k_ema.ckpt", "1920k": "benchmarks/results/digits_1920k_ema.ckpt",
          "edm2_640k": "benchmarks/results/digits_edm2_640k_ema.ckpt"}
SOLVERS = ["dpmpp_2m", "unipc", "ipndm", "evodiff_consistent"]
BASELINES = ["rescaled_entropic", "karras", "logsnr"]
FIELDS = ["model", "solver", "nfe", "grid", "fd_pixels", "fd_tune", "fd_held", "seconds", "levels"]


class Model:
    """A digits checkpoint with its learned schedule, pixel scores and cached tuning references."""

    def __init__(self, name: str, args: argparse.Namespace) -> None:
        self.name, self.args = name, args
        self.loaded = load_denoiser(MODELS[name])
        meta = self.loaded.meta
        self.shape, self.lo, self.hi = tuple(meta["sample_shape"]), meta["sigma_min"], meta["sigma_max"]
        self.schedule = EntropicSchedule.load(estimated_schedule_path(Path(MODELS[name])))
        data = checkpoint_data(self.loaded)
        self.full = FrechetScore("pixels", num_samples=args.samples, shape=self.shape)
        self.part = FrechetScore("pixels", num_samples=args.tune, shape=self.shape)
        self.full.prepare_real(data)
        self.part.prepare_real(data)
        self.x_tune = self.hi * initial_noise(torch.arange(args.tune), self.shape, TUNE_SEED)[0]
        self._reference = None

    def denoiser(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return self.loaded.denoiser(x, sigma)

    @property
    def reference(self) -> torch.Tensor:
        if self._reference is None:
            t0 = time.perf_counter()
            with torch.no_grad():
                self._reference = reference_solution(self.denoiser, self.x_tune, self.hi, self.lo)
            print(f"{self.name}: tuning-set reference {time.perf_counter() - t0:.0f} s", flush=True)
        return self._reference

    def fd(self, score: FrechetScore, x: torch.Tensor) -> float:
        score.reset()
        score.update(x)
        return score.compute()

    def score(self, solver: str, sigmas: torch.Tensor) -> dict[str, float]:
        """fd_pixels on seeds 0..N-1, and the FD of T samples of the tuning set and of the held-out set."""
        run = dict(shape=self.shape, solver=solver, sigmas=sigmas, batch_size=self.args.samples)
        x = generate(self.denoiser, torch.arange(self.args.samples), seed=0, **run)
        x_tune = generate(self.denoiser, torch.arange(self.args.tune), seed=TUNE_SEED, **run)
        return {"fd_pixels": self.fd(self.full, x), "fd_held": self.fd(self.part, x[:self.args.tune]),
                "fd_tune": self.fd(self.part, x_tune)}

    def tune(self, solver: str, nfe: int, start: torch.Tensor, objective: str) -> torch.Tensor:
        if objective == "fd_data":  # against the digits' pixel statistics, no reference solution
            return tune_sigmas(solver, self.denoiser, self.x_tune, start, objective=objective,
                               data=self.part.moments(), nfe=nfe, max_evals=self.args.max_evals)
        return tune_sigmas(solver, self.denoiser, self.x_tune, start, reference=self.reference, objective=objective,
                           nfe=nfe, max_evals=self.args.max_evals)


def sweep(args: argparse.Namespace) -> None:
    done = {(r["model"], r["solver"], int(r["nfe"]), r["grid"]) for r in read_rows(args.rows)}
    warm = {(r["model"], r["solver"], int(r["nfe"]), r["grid"]): torch.tensor([float(v) for v in r["levels"].split()],
                                                                              dtype=torch.float64)
            for r in (read_rows(args.warm_from) if args.warm_from else [])}
    for name in args.models:
        model = Model(name, args)
        todo = [(s, n, g) for n in args.nfe for s in args.solvers
                for g in ["rescaled_entropic"] + [f"tuned_{o}" for o in args.objectives] + args.baselines[1:]]
        if args.ref_nfe:  # after the first NFE's rows
            first = len(args.solvers) * (len(args.objectives) + len(args.baselines))
            todo.insert(first, ("heun", args.ref_nfe, "karras"))
        for solver, nfe, grid in todo:
            if (name, solver, nfe, grid) in done:
                continue
            steps = steps_for_nfe(solver, nfe)
            t0 = time.perf_counter()
            start = warm.get((name, solver, nfe, grid)) if grid.startswith("tuned_") else None
            start = get_sigmas("rescaled_entropic", steps, schedule=model.schedule) if start is None else start
            sigmas = model.tune(solver, nfe, start, grid[len("tuned_"):]) if grid.startswith("tuned_") \
                else get_sigmas(grid, steps, schedule=model.schedule) if grid == "rescaled_entropic" \
                else get_sigmas(grid, steps)
            seconds = time.perf_counter() - t0
            row = {"model": name, "solver": solver, "nfe": nfe, "grid": grid, **model.score(solver, sigmas),
                   "seconds": seconds if grid.startswith("tuned_") else math.nan,
                   "levels": " ".join(f"{v:.4g}" for v in sigmas.tolist())}
            append_row(args.rows, row, FIELDS)
            print(f"{name:9s} {solver:18s} NFE {nfe:2d} {grid:17s} fd_pixels {row['fd_pixels']:8.1f} "
                  f"(tune {row['fd_tune']:7.1f} held {row['fd_held']:7.1f}) {seconds:6.0f} s [{row['levels']}]",
                  flush=True)


def report(args: argparse.Namespace) -> None:
    """Markdown tables (fd_pixels per model, the tuning-set vs held-out gap) and the plot, from --rows."""
    rows = read_rows(args.rows)
    by = {(r["model"], r["solver"], int(r["nfe"]), r["grid"]): r for r in rows}
    models = [m for m in MODELS if any(r["model"] == m for r in rows)]
    grids = list(dict.fromkeys(BASELINES + sorted({r["grid"] for r in rows})))
    text = ["# Digits: solver-tuned grids, held out\n", f"Command: `{args.command}`\n",
            f"fd_pixels on seeds 0-{args.samples - 1} against the 1,797 digits (`sample.py score=fd_pixels`); "
            f"the tuner saw {args.tune} starting noises of seeds TUNE_SEED + j (never scored), reference "
            f"iPNDM 200 log-SNR steps, Nelder-Mead with at most {args.max_evals} solver runs, started from the "
            + (f"tuned grids of {args.warm_from}" if args.warm_from else
               "learned rescaled entropic grid (the dedicated pass)") + ". Bold: best grid of the row. 1 CPU thread.\n"]
    for m in models:
        ref = by.get((m, "heun", args.ref_nfe, "karras"))
        grids_m = [g for g in grids if any(k[0] == m and k[3] == g and k[1] != "heun" for k in by)]
        text += [f"## {m}: fd_pixels" + (f" (heun/karras NFE {args.ref_nfe}: {float(ref['fd_pixels']):.4g})"
                                          if ref else "") + "\n",
                 "| solver | NFE | " + " | ".join(grids_m) + " |", "|---|---|" + "---|" * len(grids_m)]
        for s in args.solvers:
            for n in sorted({int(r["nfe"]) for r in rows if r["model"] == m and r["solver"] == s}):
                vals = [float(by[(m, s, n, g)]["fd_pixels"]) if (m, s, n, g) in by else math.nan for g in grids_m]
                best = min(v for v in vals if not math.isnan(v))
                text.append(f"| {s} | {n} | " + " | ".join("-" if math.isnan(v) else f"**{v:.4g}**" if v == best
                                                           else f"{v:.4g}" for v in vals) + " |")
        text.append("")
    text += ["## Tuned grids: tuning-set vs held-out FD (same sample size), tuning time, levels\n",
             f"fd_tune, fd_held: {args.tune} samples each against all digits (their finite-sample bias dominates "
             "both); the gap held - tune of the tuned grid is compared with the starting grid's (seed noise).\n",
             "| model | solver | NFE | grid | fd_tune | fd_held | held - tune | start: held - tune | seconds | σ |",
             "|" + "---|" * 10]
    for r in rows:
        if r["grid"].startswith("tuned_"):
            tune, held = float(r["fd_tune"]), float(r["fd_held"])
            s = by.get((r["model"], r["solver"], int(r["nfe"]), "rescaled_entropic"))
            base = f"{float(s['fd_held']) - float(s['fd_tune']):+.4g}" if s else "-"
            text.append(f"| {r['model']} | {r['solver']} | {r['nfe']} | {r['grid']} | {tune:.4g} | {held:.4g} | "
                        f"{held - tune:+.4g} | {base} | {float(r['seconds']):.0f} | {r['levels']} |")
    Path(args.out).write_text("\n".join(text) + "\n")
    plot(rows, models, args)
    print(f"wrote {args.out} and {args.plot}")


def plot(rows: list[dict], models: list[str], args: argparse.Namespace) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(models), len(args.solvers), figsize=(3.6 * len(args.solvers), 3 * len(models)),
                             squeeze=False, sharey=True)
    for i, m in enumerate(models):
        ref = [float(r["fd_pixels"]) for r in rows if (r["model"], r["solver"], r["grid"]) == (m, "heun", "karras")]
        for j, s in enumerate(args.solvers):
            ax = axes[i][j]
            for g in sorted({r["grid"] for r in rows if r["model"] == m and r["solver"] == s}):
                pts = sorted((int(r["nfe"]), float(r["fd_pixels"])) for r in rows
                             if (r["model"], r["solver"], r["grid"]) == (m, s, g))
                ax.plot(*zip(*pts), marker="o", label=g, ls="-" if g.startswith("tuned") else "--")
            if ref:
                ax.axhline(ref[0], color="k", lw=0.8, label=f"heun/karras NFE {args.ref_nfe}")
                ax.axhline(1.1 * ref[0], color="k", lw=0.8, ls=":", label="+10 %")
            ax.set(title=f"{m}: {s}", xlabel="NFE", yscale="log")
            if j == 0:
                ax.set_ylabel("fd_pixels")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    Path(args.plot).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--solvers", nargs="+", default=SOLVERS)
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 4, 6, 8, 10])
    p.add_argument("--objectives", nargs="+", default=["fd"], choices=list(OBJECTIVES))
    p.add_argument("--baselines", nargs="+", default=BASELINES)
    p.add_argument("--tune", type=int, default=128, help="starting noises the tuner sees")
    p.add_argument("--samples", type=int, default=1797, help="scored samples (seeds 0..N-1)")
    p.add_argument("--max-evals", type=int, default=40)
    p.add_argument("--ref-nfe", type=int, default=80, help="heun/karras reference NFE (0: none)")
    p.add_argument("--rows", default="benchmarks/results/digits_tuned.csv")
    p.add_argument("--out", default="benchmarks/results/digits_tuned.md")
    p.add_argument("--plot", default="docs/digits_tuned.png")
    p.add_argument("--warm-from", help="rows file whose tuned grids (same model, solver, NFE) start the tuning")
    p.add_argument("--report-only", action="store_true")
    args = p.parse_args()
    args.command = "OMP_NUM_THREADS=1 PYTHONPATH=. python " + " ".join(sys.argv)
    torch.set_num_threads(1)
    if not args.report_only:
        sweep(args)
    report(args)


if __name__ == "__main__":
    main()
