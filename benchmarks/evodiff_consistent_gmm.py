"""evodiff_consistent against the released EVODiff and DPM-Solver++(2M) on the exact 64-d Gaussian mixture.

Same problem as `schedules_gmm.py` (default mixture, x_T = 80 * N(0, I) from --seed, exact denoiser, float64,
rescaled entropic and entropic grids from the mixture's exact MMSE, Fréchet distance against 65,536 fresh
samples). Two tables:

1. Convergence: median per-sample RMSE to the exact ODE endpoint at N = 24 ... 768 steps on the Karras, log-SNR
   and rescaled-entropic grids; the fitted order over N = 24-96 (the range the released method was diagnosed on)
   and over N = 192-768, and the local order log2(e_N / e_2N) of each doubling.
2. Accuracy vs NFE on the four schedules: RMSE, median per-sample RMSE and Fréchet distance. Besides the three
   registered solvers, two fixed-weight ablations of evodiff_consistent show what the per-sample weight does:
   eta = 0 (forward difference only) and eta = 1/2 (the even blend); eta = 1 is dpmpp_2m.
4. The weight of evodiff_consistent (eta=None per sample, or fixed 0, 1/6, 1/2, 1) and UniPC-2: table 2's
   columns on Karras, log-SNR and rescaled-entropic grids at --nfe, and table 1's convergence at --steps.
3. The same as 2 with a trained denoiser (--mlp: the MLP of `gmm_nfe.py`, EMA weights, float32) on Karras,
   log-SNR and its training schedule; errors against the exact ODE endpoint of the same x_T.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_consistent_gmm.py \
        > benchmarks/results/evodiff_consistent_gmm.log
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_consistent_gmm.py --tables 3 --ode-steps 500 \
        --mlp benchmarks/results/gmm_ema.ckpt > benchmarks/results/evodiff_consistent_gmm_mlp.log
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_consistent_gmm.py --tables 4 --nfe 5 10 15 20 --ode-steps 1000 \
        --steps 24 48 96 > benchmarks/results/evodiff_consistent_weights_gmm.log
"""

from __future__ import annotations

import argparse
import math
import time
from typing import Callable

import numpy as np
import torch
from torch import Tensor

from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.solvers import solve
from evodiff_pl.toy import GaussianMixture

# label -> (solver, options)
SOLVERS = {
    "dpmpp_2m": ("dpmpp_2m", {}),
    "evodiff": ("evodiff", {}),
    "evodiff_consistent": ("evodiff_consistent", {}),
    "  eta=0 (ablation)": ("evodiff_consistent", {"eta": 0.0}),
    "  eta=1/2 (ablation)": ("evodiff_consistent", {"eta": 0.5}),
}
# table 4: the weight of the backward difference, per sample (eta=None) or fixed; eta = 1 is dpmpp_2m and
# eta = 1/6 UniC-2's weight in the limit of uniform small steps (docs/evodiff_consistent.md §3)
WEIGHTS = {
    "per-sample (None)": ("evodiff_consistent", {"eta": None}),
    "eta=0": ("evodiff_consistent", {"eta": 0.0}),
    "eta=1/6": ("evodiff_consistent", {"eta": 1 / 6}),
    "eta=1/2": ("evodiff_consistent", {"eta": 0.5}),
    "eta=1 (dpmpp_2m)": ("evodiff_consistent", {"eta": 1.0}),
    "unipc": ("unipc", {}),
}
CONVERGENCE_SOLVERS = ("dpmpp_2m", "evodiff", "evodiff_consistent")
CONVERGENCE_GRIDS = ("karras", "logsnr", "rescaled_entropic")
SCHEDULES = ("karras", "logsnr", "rescaled_entropic", "entropic")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=4096, help="trajectories per solver run")
    p.add_argument("--fresh", type=int, default=65536, help="fresh data samples for the Fréchet distance")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 6, 8, 10, 12, 15, 20, 35])
    p.add_argument("--steps", type=int, nargs="+", default=[24, 48, 96, 192, 384, 768], help="convergence table")
    p.add_argument("--ode-steps", type=int, default=2000, help="RK4 steps of the exact ODE endpoint")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tables", type=int, nargs="+", default=[1, 2], choices=[1, 2, 3, 4])
    p.add_argument("--mlp", default=None, help="checkpoint of the trained mixture MLP (table 3)")
    args = p.parse_args()
    torch.set_num_threads(1)
    smin, smax = 0.002, 80.0
    gm = GaussianMixture.default(dim=64, n_components=8, seed=0)
    x_T = smax * torch.randn(args.samples, gm.dim, generator=torch.Generator().manual_seed(args.seed),
                             dtype=torch.float64)
    mu_data, cov_data = gaussian_fit(gm.sample(args.fresh, generator=torch.Generator().manual_seed(args.seed + 1)))
    t0 = time.perf_counter()
    exact = gm.ode_solve(x_T, smax, smin, n_steps=args.ode_steps)
    print(f"exact ODE endpoint ({args.ode_steps} RK4 steps, {args.samples} samples): {time.perf_counter() - t0:.0f} s")
    sigmas = mixture_grids(gm, smin, smax, args.seed)

    def errors(x: Tensor) -> tuple[float, float]:
        per_sample = (x - exact).square().mean(1)
        return per_sample.mean().sqrt().item(), per_sample.sqrt().median().item()

    if 1 in args.tables:
        convergence(args, gm, x_T, sigmas, errors)
    if 2 in args.tables:
        floor = frechet_distance(*gaussian_fit(exact), mu_data, cov_data)
        print(f"\nTable 2: error vs NFE (N steps = NFE for every solver here); FD against {args.fresh} fresh "
              f"samples; the exact ODE endpoint's own FD: {floor:.4f}")
        grids = {s: (lambda n, s=s: sigmas(s, n)) for s in SCHEDULES}
        accuracy(args, gm.denoise, x_T, grids, errors, mu_data, cov_data)
    if 4 in args.tables:
        floor = frechet_distance(*gaussian_fit(exact), mu_data, cov_data)
        print(f"\nTable 4: the weight eta of evodiff_consistent; FD against {args.fresh} fresh samples "
              f"(exact ODE endpoint's own FD: {floor:.4f})")
        accuracy(args, gm.denoise, x_T, {s: (lambda n, s=s: sigmas(s, n)) for s in CONVERGENCE_GRIDS}, errors,
                 mu_data, cov_data, WEIGHTS)
        convergence(args, gm, x_T, sigmas, errors, WEIGHTS)
    if 3 in args.tables:
        if args.mlp is None:
            raise SystemExit("table 3 needs --mlp CKPT")
        loaded = load_denoiser(args.mlp)
        print(f"\nTable 3: the trained MLP {args.mlp} (EMA, float32), errors against the exact ODE endpoint")
        grids = {"karras": lambda n: sigmas("karras", n), "logsnr": lambda n: sigmas("logsnr", n),
                 "rescaled_entropic_train": lambda n: get_sigmas("rescaled_entropic", n, smin, smax,
                                                                 schedule=loaded.schedule)}
        accuracy(args, loaded.denoiser, x_T.float(), grids, errors, mu_data, cov_data)


def mixture_grids(gm: GaussianMixture, smin: float, smax: float, seed: int) -> Callable[[str, int], Tensor]:
    """sigmas(schedule, n): fixed grids by name, (rescaled_)entropic from the mixture's exact MMSE on 129 levels."""
    levels = torch.logspace(math.log10(smin), math.log10(smax), 129, dtype=torch.float64)
    m = gm.mmse(levels, n_mc=4096, generator=torch.Generator().manual_seed(seed + 2))
    learned = {k: EntropicSchedule.from_mmse(levels, m, kind=k, dim=gm.dim) for k in ("rescaled_entropic", "entropic")}

    def sigmas(schedule: str, n: int) -> Tensor:
        return get_sigmas(schedule, n, smin, smax, **({"schedule": learned[schedule]} if schedule in learned else {}))

    return sigmas


def convergence(args, gm: GaussianMixture, x_T: Tensor, sigmas, errors, solvers: dict | None = None) -> None:
    print(f"\nTable 1: median per-sample RMSE to the exact ODE endpoint vs steps N ({args.samples} samples)")
    head = f"{'grid':<18} {'solver':<20} " + " ".join(f"{'N=' + str(n):>9}" for n in args.steps)
    print(head + "   order(24-96)  order(192-768)  local orders per doubling")
    print("-" * (len(head) + 60))
    for grid in CONVERGENCE_GRIDS:
        for label, (solver, options) in (solvers or {k: SOLVERS[k] for k in CONVERGENCE_SOLVERS}).items():
            med = [errors(solve(solver, gm.denoise, x_T, sigmas(grid, n), **options))[1] for n in args.steps]

            def order(lo: int, hi: int) -> str:
                idx = [k for k, n in enumerate(args.steps) if lo <= n <= hi]
                if len(idx) < 2:
                    return "-"
                return f"{-np.polyfit(np.log([args.steps[k] for k in idx]), np.log([med[k] for k in idx]), 1)[0]:.2f}"

            local = " ".join(f"{math.log(a / b) / math.log(m / n):.2f}"
                             for a, b, n, m in zip(med, med[1:], args.steps, args.steps[1:]))
            print(f"{grid:<18} {label:<20} " + " ".join(f"{e:9.2e}" for e in med)
                  + f"   {order(24, 96):>12}  {order(192, 768):>14}  {local}", flush=True)



@torch.no_grad()
def accuracy(args, denoiser, x_T: Tensor, grids: dict, errors, mu_data: Tensor, cov_data: Tensor,
             solvers: dict = SOLVERS) -> None:
    print(f"{'schedule':<24} {'solver':<20} {'NFE':>3} {'RMSE':>10} {'med RMSE':>10} {'FD':>10}")
    for schedule, grid in grids.items():
        for budget in args.nfe:
            for label, (solver, options) in solvers.items():
                x = solve(solver, denoiser, x_T, grid(budget), **options)
                rmse, med = errors(x)
                fd = frechet_distance(*gaussian_fit(x), mu_data, cov_data)
                print(f"{schedule:<24} {label:<20} {budget:>3} {rmse:10.4g} {med:10.4g} {fd:10.4g}", flush=True)
            print()

if __name__ == "__main__":
    main()
