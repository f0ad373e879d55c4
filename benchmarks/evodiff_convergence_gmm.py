"""Does the released EVODiff converge? Its error, η* clipping and effective coefficient vs N on the exact mixture.

Same problem as `evodiff_consistent_gmm.py` (default 64-d mixture, x_T = 80 * N(0, I) from --seed, exact
denoiser, float64; log-SNR and rescaled entropic grids from the mixture's exact MMSE), with few samples and
N up to 12288 steps. For each grid and N: the median per-sample RMSE to the exact ODE endpoint of

    evodiff              the released solver (`evodiff_pl.solvers.evodiff`, unchanged)
    evodiff, ρ=1         the same with the balance ρ = proj(D_{i-1}, D_{i-2}) replaced by 1, so that
                         β = (1 - w) b + w ρ = 1 exactly on log-SNR grids (b = 1 there) and 1 + O(h²) elsewhere
    evodiff, last=reg    lower_order_final=False: the regular step at i = N instead of the special final step
    dpmpp_2m             DPM-Solver++(2M), for scale

and, for the released solver, over its main-loop steps and samples: the fraction of |η*| clipped at 2 (the
unclipped <B_next + B_pre, B_next - B_pre> / ||B_next - B_pre||^2 of docs/method.md §2.4), and the median
effective coefficient κ of its correction on the DPM-Solver++(2M) one, x_i - Φ_i(x_{i-1}) ≈ κ · c_i δ_b with
c_i = (1 - e^{-h})/2, δ_b = (D_{i-1} - D_{i-2})/r_i (least squares per sample): a second-order step needs κ → 1
(docs/evodiff_consistent.md §1). The variants are made by patching the module's `_proj` / `clipped_ratio`
inside this script only.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_convergence_gmm.py \
        > benchmarks/results/evodiff_convergence_gmm.log
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path
from unittest import mock

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from evodiff_consistent_gmm import mixture_grids  # noqa: E402

from evodiff_pl.solvers import solve  # noqa: E402
from evodiff_pl.solvers.base import clipped_ratio, dot  # noqa: E402
from evodiff_pl.toy import GaussianMixture  # noqa: E402

RELEASED = sys.modules["evodiff_pl.solvers.evodiff"]
VARIANTS = ("evodiff", "evodiff, ρ=1", "evodiff, last=reg", "dpmpp_2m")


class Recorder:
    """The mixture's denoiser, keeping its last 3 outputs (call k of evodiff evaluates D at sigma_k), and a callback
    that records κ_i = <x_i - Φ_i(x_{i-1}), c δ_b> / ||c δ_b||^2 per sample for the main-loop steps i = 2 .. N-1."""

    def __init__(self, gm: GaussianMixture, x_T: Tensor, s: list[float]) -> None:
        self.gm, self.s, self.d, self.x, self.kappa = gm, s, [], x_T, []

    def __call__(self, x: Tensor, sigma: Tensor) -> Tensor:
        self.d = self.d[-2:] + [self.gm.denoise(x, sigma)]
        return self.d[-1]

    def callback(self, i: int, sigma: float, x: Tensor) -> None:
        s = self.s
        if 2 <= i < len(s) - 1:  # D_0 .. D_i have been evaluated: self.d = [D_{i-2}, D_{i-1}, D_i]
            q, h_prev, h = s[i] / s[i - 1], math.log(s[i - 2] / s[i - 1]), math.log(s[i - 1] / s[i])
            step = x - (q * self.x + (1 - q) * self.d[1])
            ref = (0.5 * (1 - q) * h / h_prev) * (self.d[1] - self.d[0])
            self.kappa.append((dot(step, ref) / dot(ref, ref)).flatten())
        self.x = x

    def is_prediction(self, t: Tensor) -> bool:
        return any(t is d for d in self.d)


@contextlib.contextmanager
def patched(rec: Recorder, unit_balance: bool, ratios: list[Tensor]):
    """Record η*'s unclipped ratio (the loop's one direct `clipped_ratio` call); optionally set ρ = 1 (ρ is the
    `_proj` of two denoiser outputs; ζ* and the N > 20 rule's c project other vectors)."""

    def proj(a: Tensor, b: Tensor) -> Tensor:
        if unit_balance and rec.is_prediction(a) and rec.is_prediction(b):
            return torch.ones_like(dot(a, b))
        return clipped_ratio(dot(a, b), dot(b, b))

    def recording_ratio(num: Tensor, den: Tensor) -> Tensor:
        ratios.append(num / den)
        return clipped_ratio(num, den)

    with mock.patch.object(RELEASED, "_proj", proj), mock.patch.object(RELEASED, "clipped_ratio", recording_ratio):
        yield


def run(variant: str, gm: GaussianMixture, x_T: Tensor, sigmas: Tensor) -> tuple[Tensor, float, float]:
    """(endpoint, fraction of |η*| clipped, median κ); the last two only for the released solver (else nan)."""
    if variant == "dpmpp_2m":
        return solve("dpmpp_2m", gm.denoise, x_T, sigmas), math.nan, math.nan
    rec, ratios = Recorder(gm, x_T, sigmas.tolist()), []
    options = {"lower_order_final": False} if variant == "evodiff, last=reg" else {}
    with patched(rec, variant == "evodiff, ρ=1", ratios):
        x = solve("evodiff", rec, x_T, sigmas, callback=rec.callback, **options)
    if variant != "evodiff":
        return x, math.nan, math.nan
    clipped = (torch.cat([r.flatten() for r in ratios]).abs() >= 2).double().mean().item()
    return x, clipped, torch.cat(rec.kappa).median().item()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--steps", type=int, nargs="+", default=[24 * 2**k for k in range(10)])
    p.add_argument("--ode-steps", type=int, default=4000, help="RK4 steps of the exact ODE endpoint")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    smin, smax = 0.002, 80.0
    gm = GaussianMixture.default(dim=64, n_components=8, seed=0)
    x_T = smax * torch.randn(args.samples, gm.dim, generator=torch.Generator().manual_seed(args.seed),
                             dtype=torch.float64)
    exact = gm.ode_solve(x_T, smax, smin, n_steps=args.ode_steps)
    sigmas = mixture_grids(gm, smin, smax, args.seed)
    rms = exact.square().mean(1).sqrt().median().item()
    print(f"{args.samples} samples; median RMS of the exact endpoint {rms:.3f}, σ_min × that = {smin * rms:.2e}")
    print(f"{'grid':<18} {'N':>6} " + " ".join(f"{v:>17}" for v in VARIANTS) + f" {'|η*| clipped':>13} {'κ':>6}")
    for grid in ("logsnr", "rescaled_entropic"):
        errs = {v: [] for v in VARIANTS}
        for n in args.steps:
            t0 = time.perf_counter()
            diag = ""
            for variant in VARIANTS:
                x, clipped, kappa = run(variant, gm, x_T, sigmas(grid, n))
                errs[variant].append((x - exact).square().mean(1).sqrt().median().item())
                if variant == "evodiff":
                    diag = f" {clipped:13.3f} {kappa:6.3f}"
            print(f"{grid:<18} {n:>6} " + " ".join(f"{errs[v][-1]:17.3e}" for v in VARIANTS) + diag
                  + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)
        for v in VARIANTS:
            local = " ".join(f"{math.log2(a / b):.2f}" for a, b in zip(errs[v], errs[v][1:]))
            print(f"  {grid} {v}: local order log2(e_N / e_2N) per doubling: {local}")
        print()

if __name__ == "__main__":
    main()
