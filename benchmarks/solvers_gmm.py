"""Every solver on the exact 64-d Gaussian mixture, and their cost around a small convolutional denoiser.

Table 1: every solver (default options) x schedule (karras, logsnr) x NFE from the same x_T = 80 * N(0, I)
with the exact denoiser, in float64: RMSE to the exact probability-flow ODE endpoint (over all entries), the
median of the per-sample RMSE, and the Fréchet distance between Gaussians fitted to the samples and to fresh
data (docs/method.md §4); the floor line is fresh data against another fresh draw of the same size. Heun and
edm_stochastic spend 2 NFE per step: they run NFE / 2 steps and odd NFE are skipped. The stochastic solvers
(edm_stochastic, dpmpp_2m_sde; per-sample noise from seeds 10^6 + j) do not follow the ODE: for them only FD
is meaningful.

Table 1b: the choice of lower_order_final (True: always lower the last steps, "auto": only below 10 steps,
False: never) for the multistep solvers, as the median per-sample RMSE to the exact endpoint.

Table 2: wall time per step and per NFE of each solver around a small EDM-preconditioned DDPM++ U-Net
(SongUNet, 1.26M parameters, float32, batch 64, 3x32x32), relative to euler; all solvers are timed
interleaved in one run and the medians over the repeats are reported. The overhead is the solver's own
tensor work on top of the network.

    PYTHONPATH=. python benchmarks/solvers_gmm.py [--samples 4096] [--ode-steps 500] [--repeats 7] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from evodiff_pl.sampling.generate import steps_for_nfe
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import EDMPrecond
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.solvers import SOLVERS, STOCHASTIC, nfe, seeded_noise, solve
from evodiff_pl.toy import GaussianMixture

NFES = (5, 6, 8, 10, 12, 15, 20)
SCHEDULES = ("karras", "logsnr")
SIGMA_MIN, SIGMA_MAX = 0.002, 80.0
LOF_NFES = (5, 6, 8, 10, 12, 15, 20, 30)
LOF_SOLVERS = (("dpmpp_2m", {}), ("dpmpp_3m", {}), ("unipc", {}), ("unipc", {"order": 3}),
               ("unipc", {"order": 3, "variant": "bh1"}))


def noise_for(name: str, batch: int, seed: int) -> dict:
    """noise= for a stochastic solver: sample j draws from seed 10^6 + seed + j."""
    return {"noise": seeded_noise(torch.arange(batch) + 10**6 + seed)} if name in STOCHASTIC else {}


def accuracy_table(args: argparse.Namespace) -> None:
    g = GaussianMixture.default(dim=64, n_components=8, seed=0)
    gen = torch.Generator().manual_seed(args.seed)
    x_T = SIGMA_MAX * torch.randn(args.samples, g.dim, generator=gen, dtype=torch.float64)
    data, data2 = g.sample(args.samples, gen), g.sample(args.samples, gen)
    t0 = time.perf_counter()
    exact = g.ode_solve(x_T, SIGMA_MAX, SIGMA_MIN, n_steps=args.ode_steps)
    print(f"exact endpoint: RK4 with {args.ode_steps} steps in ln sigma, {time.perf_counter() - t0:.1f} s")
    lower_order_table(g, x_T, exact)
    stats = gaussian_fit(data)
    floor = frechet_distance(*gaussian_fit(data2), *stats)
    print(f"\nTable 1: default mixture (dim 64, 8 components), {args.samples} samples, float64")
    print(f"{'schedule':<8} {'solver':<18} {'NFE':>3} {'steps':>5} {'RMSE':>9} {'med RMSE':>9} {'FD':>9}")
    print(f"{'':<8} {'floor':<18} {'':>3} {'':>5} {'':>9} {'':>9} {floor:9.2e}  (fresh data vs fresh data)")
    for schedule in SCHEDULES:
        for name in SOLVERS:
            for budget in NFES:
                try:
                    n = steps_for_nfe(name, budget)
                except ValueError:  # e.g. heun and an odd budget
                    continue
                sigmas = get_sigmas(schedule, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
                x = solve(name, g, x_T, sigmas, **noise_for(name, len(x_T), args.seed))
                sq = (x - exact).square()
                rmse, med = sq.mean().sqrt().item(), sq.mean(1).sqrt().median().item()
                fd = frechet_distance(*gaussian_fit(x), *stats)
                print(f"{schedule:<8} {name:<18} {budget:>3} {n:>5} {rmse:9.2e} {med:9.2e} {fd:9.2e}")


def lower_order_table(g: GaussianMixture, x_T: torch.Tensor, exact: torch.Tensor) -> None:
    print("\nTable 1b: lower_order_final, median per-sample RMSE to the exact endpoint (NFE = steps)")
    print(f"{'schedule':<8} {'solver':<28} {'lof':<5} " + " ".join(f"{n:>8}" for n in LOF_NFES))
    for schedule in SCHEDULES:
        for name, options in LOF_SOLVERS:
            label = name + "".join(f" {k}={v}" for k, v in options.items())
            for lof in (True, "auto", False):
                errs = []
                for n in LOF_NFES:
                    sigmas = get_sigmas(schedule, n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)
                    x = solve(name, g, x_T, sigmas, lower_order_final=lof, **options)
                    errs.append((x - exact).square().mean(1).sqrt().median().item())
                print(f"{schedule:<8} {label:<28} {str(lof):<5} " + " ".join(f"{e:8.2e}" for e in errs))


@torch.no_grad()
def timing_table(args: argparse.Namespace) -> None:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    backbone = build_network("songunet", img_resolution=32, in_channels=3, out_channels=3, model_channels=32,
                             channel_mult=(1, 2, 2), num_blocks=1, attn_resolutions=(8,), dropout=0.0)
    net = EDMPrecond(backbone).to(device).eval()
    gen = torch.Generator(device=device).manual_seed(args.seed)
    x_T = SIGMA_MAX * torch.randn(64, 3, 32, 32, generator=gen, device=device)
    n = args.timing_steps
    sigmas = get_sigmas("logsnr", n, sigma_min=SIGMA_MIN, sigma_max=SIGMA_MAX)

    def run(name: str) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        options = noise_for(name, len(x_T), args.seed)
        t0 = time.perf_counter()
        solve(name, net, x_T, sigmas, **options)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    for name in SOLVERS:
        run(name)
    times: dict[str, list[float]] = {name: [] for name in SOLVERS}
    for _ in range(args.repeats):
        for name in SOLVERS:
            times[name].append(run(name))
    med = {name: statistics.median(t) for name, t in times.items()}
    per_nfe = {name: med[name] / nfe(name, n) for name in SOLVERS}
    print(f"\nTable 2: SongUNet (1.26M params), float32, batch 64x3x32x32, {device.type}, {n} steps, "
          f"median of {args.repeats} interleaved repeats")
    print(f"{'solver':<18} {'NFE':>4} {'ms/step':>8} {'ms/NFE':>8} {'per NFE / euler':>16}")
    for name in SOLVERS:
        print(f"{name:<18} {nfe(name, n):>4} {1e3 * med[name] / n:8.2f} {1e3 * per_nfe[name]:8.2f} "
              f"{per_nfe[name] / per_nfe['euler']:16.3f}")
    for name in ("evodiff", "evodiff_consistent"):
        print(f"{name} overhead over dpmpp_2m (same NFE): {100 * (med[name] / med['dpmpp_2m'] - 1):+.1f} %")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=4096, help="mixture samples per solver run")
    p.add_argument("--ode-steps", type=int, default=500, help="RK4 steps of the exact endpoint (~3e-8 relative)")
    p.add_argument("--repeats", type=int, default=7, help="interleaved timing repeats")
    p.add_argument("--timing-steps", type=int, default=10, help="solver steps per timed run")
    p.add_argument("--device", default=None, help="timing device (default: cuda if available)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: no oversubscription on shared cores)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    accuracy_table(args)
    timing_table(args)


if __name__ == "__main__":
    main()
