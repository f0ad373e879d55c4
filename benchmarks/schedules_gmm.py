"""Sampling schedules on the exact 64-d Gaussian mixture: karras, logsnr, rescaled entropic and entropic time.

The two entropic schedules come from the mixture's exact (Rao-Blackwellised) MMSE curve. Every solver runs
from the same x_T = 80 * N(0, I) with the exact denoiser, in float64, and is scored by the RMSE to the exact
probability-flow ODE endpoint (mean over all entries, and the median of the per-sample RMSE) and by the
Fréchet distance between Gaussians fitted to its samples and to fresh data (docs/method.md §4). Heun spends 2 NFE per
step, so it runs NFE // 2 steps. Prints one table and writes three plots:

    docs/schedules_gmm_curves.png   the MMSE curve, q = lambda * m, and the level densities of the four grids
    docs/schedules_gmm_grids.png    sigma against the step fraction for the four schedules, NFE-10 levels marked
    docs/schedules_gmm_errors.png   RMSE and Fréchet distance against NFE, per solver and schedule

    PYTHONPATH=. python benchmarks/schedules_gmm.py [--samples 4096] [--nfe 5 10 20] [--ode-steps 2000]
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import NullFormatter, ScalarFormatter  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402

from evodiff_pl.schedules.entropic import EntropicSchedule, edm_loss_weight  # noqa: E402
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit  # noqa: E402
from evodiff_pl.schedules.grids import get_sigmas  # noqa: E402
from evodiff_pl.solvers import nfe, solve  # noqa: E402
from evodiff_pl.toy import GaussianMixture  # noqa: E402

SOLVERS = ("euler", "heun", "dpmpp_2m", "evodiff")
SCHEDULES = ("karras", "logsnr", "rescaled_entropic", "entropic")
STYLE = {"karras": "C0", "logsnr": "C1", "rescaled_entropic": "C2", "entropic": "C3"}


def steps_for(solver: str, budget: int) -> int:
    """Grid intervals spending at most `budget` denoiser calls (Heun: 2 per step)."""
    return max(budget // 2, 1) if solver == "heun" else budget


def run(args: argparse.Namespace) -> None:
    gm = GaussianMixture.default(dim=64, n_components=8, seed=0)
    g = torch.Generator().manual_seed(args.seed)
    x_T = args.sigma_max * torch.randn(args.samples, gm.dim, generator=g, dtype=torch.float64)
    fresh = gm.sample(args.fresh, generator=torch.Generator().manual_seed(args.seed + 1))
    mu_data, cov_data = gaussian_fit(fresh)

    t0 = time.perf_counter()
    exact = gm.ode_solve(x_T, args.sigma_max, args.sigma_min, n_steps=args.ode_steps)
    print(f"exact ODE endpoint ({args.ode_steps} RK4 steps, {args.samples} samples): {time.perf_counter() - t0:.0f} s")
    t0 = time.perf_counter()
    grid = torch.logspace(math.log10(args.sigma_min), math.log10(args.sigma_max), args.mmse_levels, dtype=torch.float64)
    m = gm.mmse(grid, n_mc=args.mmse_mc, generator=torch.Generator().manual_seed(args.seed + 2))
    print(f"exact MMSE on {args.mmse_levels} levels x {args.mmse_mc} samples: {time.perf_counter() - t0:.0f} s")
    learned = {k: EntropicSchedule.from_mmse(grid, m, kind=k, dim=gm.dim) for k in ("rescaled_entropic", "entropic")}

    def sigmas(schedule: str, n_steps: int) -> Tensor:
        options = {"schedule": learned[schedule]} if schedule in learned else {}
        return get_sigmas(schedule, n_steps, args.sigma_min, args.sigma_max, **options)

    floor = frechet_distance(*gaussian_fit(exact), mu_data, cov_data)
    rows = []
    for solver in SOLVERS:
        for budget in args.nfe:
            n_steps = steps_for(solver, budget)
            for schedule in SCHEDULES:
                x = solve(solver, gm.denoise, x_T, sigmas(schedule, n_steps))
                per_sample = (x - exact).square().mean(1)
                rows.append({"solver": solver, "budget": budget, "nfe": nfe(solver, n_steps), "schedule": schedule,
                             "rmse": per_sample.mean().sqrt().item(), "median": per_sample.sqrt().median().item(),
                             "fd": frechet_distance(*gaussian_fit(x), mu_data, cov_data)})
    print_table(rows, floor, args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    plot_curves(grid, m, learned, args, out / "schedules_gmm_curves.png")
    plot_grids(args, sigmas, out / "schedules_gmm_grids.png")
    plot_errors(rows, floor, args, out / "schedules_gmm_errors.png")


def print_table(rows: list[dict], floor: float, args: argparse.Namespace) -> None:
    print(f"\n{args.samples} samples from x_T = {args.sigma_max:g} N(0, I) to sigma_min = {args.sigma_min:g}; "
          f"FD against {args.fresh} fresh samples (exact ODE endpoint: FD {floor:.5f}).")
    print("* = best schedule for this solver and budget (per column)\n")
    head = f"{'solver':<9} {'NFE':>3} {'schedule':<18} {'RMSE':>10} {'median RMSE':>12} {'Fréchet':>10}"
    print(head)
    print("-" * len(head))
    for i in range(0, len(rows), len(SCHEDULES)):
        group = rows[i : i + len(SCHEDULES)]
        best = {key: min(r[key] for r in group) for key in ("rmse", "median", "fd")}
        for r in group:
            cells = [f"{r[key]:.4g}{'*' if r[key] == best[key] else ' '}" for key in ("rmse", "median", "fd")]
            print(f"{r['solver']:<9} {r['nfe']:>3} {r['schedule']:<18} {cells[0]:>10} {cells[1]:>12} {cells[2]:>10}")
        print()
    print("rescaled_entropic against the better of karras and logsnr (wins / budgets):")
    for solver in SOLVERS:
        mine = [r for r in rows if r["solver"] == solver]
        wins = {}
        for key in ("rmse", "median", "fd"):
            wins[key] = sum(
                next(r[key] for r in mine if r["budget"] == b and r["schedule"] == "rescaled_entropic")
                < min(r[key] for r in mine if r["budget"] == b and r["schedule"] in ("karras", "logsnr"))
                for b in args.nfe
            )
        print(f"  {solver:<9} RMSE {wins['rmse']}/{len(args.nfe)}, median RMSE {wins['median']}/{len(args.nfe)}, "
              f"Fréchet {wins['fd']}/{len(args.nfe)}")


def plot_curves(grid: Tensor, m: Tensor, learned: dict, args: argparse.Namespace, path: Path) -> None:
    fig, (ax_m, ax_r) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax_m.loglog(grid, m, "k-", label="mixture MMSE m(σ) (per dim)")
    # Gaussian data N(0, sigma_d^2 I): m = sigma^2 sigma_d^2 / (sigma^2 + sigma_d^2)  (docs/method.md §3)
    ax_m.loglog(grid, 1 / edm_loss_weight(grid, 0.5), "k:", label="N(0, 0.5² I) MMSE")
    # q = lambda(sigma) m  (docs/method.md §3)
    ax_m.loglog(grid, edm_loss_weight(grid, 0.5) * m, "C4--", label="q = λ(σ)·m (σ_d = 0.5)")
    ax_m.set_xlabel("σ")
    ax_m.set_title("per-level error of the exact denoiser")
    ax_m.legend(fontsize=8)
    ax_m.grid(True, which="both", alpha=0.3)
    u = torch.linspace(math.log(args.sigma_min), math.log(args.sigma_max), 1024, dtype=torch.float64)
    s = u.exp()
    for kind, sched in learned.items():
        r = sched.rate(s)
        # normalised rate d tau / d ln sigma = rate / integral of rate over [sigma_min, sigma_max]  (docs/method.md §3)
        density = r / torch.trapezoid(r, u)
        ax_r.semilogx(s, density, color=STYLE[kind], label=f"{kind}")
    # Karras: tau = (sigma^(1/rho) - sigma_min^(1/rho)) / (sigma_max^(1/rho) - sigma_min^(1/rho)), rho = 7  (docs/method.md §1)
    lo, hi = args.sigma_min ** (1 / 7), args.sigma_max ** (1 / 7)
    ax_r.semilogx(s, s ** (1 / 7) / 7 / (hi - lo), color=STYLE["karras"], label="karras ρ=7")
    ax_r.semilogx(s, torch.full_like(s, 1 / (u[-1] - u[0])), color=STYLE["logsnr"], label="logsnr")
    ax_r.set_yscale("log")
    ax_r.set_xlabel("σ")
    ax_r.set_ylabel("dτ / d ln σ (levels per unit ln σ, normalised)")
    ax_r.set_title("where each schedule puts its levels")
    ax_r.legend(fontsize=8)
    ax_r.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_grids(args: argparse.Namespace, sigmas: Callable[[str, int], Tensor], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    fine, coarse = 256, 10
    for schedule in SCHEDULES:
        ax.semilogy(torch.arange(fine + 1) / fine, sigmas(schedule, fine), "-", color=STYLE[schedule], label=schedule)
        ax.semilogy(torch.arange(coarse + 1) / coarse, sigmas(schedule, coarse), "o", color=STYLE[schedule], ms=4)
    ax.set_xlabel("step fraction j / N  (= 1 - τ for the entropic schedules)")
    ax.set_ylabel("σ")
    ax.set_title(f"schedules on [{args.sigma_min:g}, {args.sigma_max:g}]; dots: the 10-step grids")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def plot_errors(rows: list[dict], floor: float, args: argparse.Namespace, path: Path) -> None:
    fig, axes = plt.subplots(2, len(SOLVERS), figsize=(3.4 * len(SOLVERS), 6.2), sharey="row")
    for col, solver in enumerate(SOLVERS):
        for schedule in SCHEDULES:
            rs = [r for r in rows if r["solver"] == solver and r["schedule"] == schedule]
            for ax, key in zip(axes[:, col], ("rmse", "fd")):
                ax.loglog([r["nfe"] for r in rs], [r[key] for r in rs], "o-", color=STYLE[schedule], label=schedule)
        axes[1, col].axhline(floor, color="k", ls=":", lw=1, label="exact ODE endpoint")
        axes[0, col].set_title(solver)
        axes[1, col].set_xlabel("NFE")
        for ax in axes[:, col]:
            ax.set_xticks(sorted({r["nfe"] for r in rows if r["solver"] == solver}))
            ax.xaxis.set_major_formatter(ScalarFormatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.grid(True, which="both", alpha=0.3)
    axes[0, 0].set_ylabel("RMSE to exact ODE endpoint")
    axes[1, 0].set_ylabel("Fréchet distance to data")
    axes[1, -1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"wrote {path}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="trajectories per solver run")
    p.add_argument("--fresh", type=int, default=65536, help="fresh data samples for the Fréchet distance")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20], help="denoiser-call budgets")
    p.add_argument("--ode-steps", type=int, default=2000, help="RK4 steps of the exact ODE endpoint")
    p.add_argument("--mmse-levels", type=int, default=129, help="log-spaced levels of the exact MMSE curve")
    p.add_argument("--mmse-mc", type=int, default=4096, help="Monte-Carlo samples per MMSE level")
    p.add_argument("--sigma-min", type=float, default=0.002)
    p.add_argument("--sigma-max", type=float, default=80.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="docs", help="directory of the plots")
    run(p.parse_args())


if __name__ == "__main__":
    main()
