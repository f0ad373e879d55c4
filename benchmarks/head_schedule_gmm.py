"""The entropic schedule of an EDM2 network's log-variance head against the exact one, the tracker's and the
dedicated pass's, on the 64-d Gaussian mixture (configs/gmm_edm2.yaml: the MLP of gmm.yaml inside EDM2Precond).

Curves q(σ) = λ(σ)·m(σ), each from its own source:

    exact          the mixture's exact MMSE (`GaussianMixture.mmse`, Rao-Blackwellised Monte Carlo)
    head           e^{u(σ)} of the trained EMA's head, trusted on exp(P_mean ± 2.5 P_std), constant beyond
    head_all       the same head believed over all of [σ_min, σ_max] (no trusted range)
    tracker        the σ-binned training loss (the checkpoint's schedule)
    pass           the dedicated pass on the trained EMA (`estimate_mmse`, K levels x M pairs)

Printed: q / q_exact at a few σ; max |Δ ln σ| of each schedule's grid from the exact schedule's at each NFE
(rescaled entropic and entropic); and sample quality with each schedule, for the trained network and for the
exact denoiser (the schedule alone): Fréchet distance of fitted Gaussians to fresh data and RMSE to the exact
probability-flow ODE endpoint from the same x_T (as gmm_nfe.py).

    OMP_NUM_THREADS=1 python train.py --config configs/gmm_edm2.yaml run.dir=benchmarks/runs/gmm_edm2
    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/head_schedule_gmm.py --run benchmarks/runs/gmm_edm2
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from evodiff_pl.sampling import cli as sampling
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.schedules.entropic import EntropicSchedule, edm_loss_weight, estimate_mmse
from evodiff_pl.sampling.generate import EvalSpec, generate, initial_noise
from evodiff_pl.schedules.head import head_schedule, head_schedule_of_checkpoint, trusted_range
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.sampling.plan import with_kind

SOURCES = ["exact", "head", "head_all", "tracker", "pass"]
PROBE_SIGMAS = [0.002, 0.005, 0.02, 0.05, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 80.0]


def curves(args: argparse.Namespace):
    """The loaded checkpoint, its mixture and the rescaled entropic schedule of every source."""
    loaded = load_denoiser(args.run)
    meta = loaded.meta
    gm = sampling.checkpoint_data(loaded).mixture
    smin, smax = meta["sigma_min"], meta["sigma_max"]
    sig = torch.logspace(math.log10(smin), math.log10(smax), args.levels, dtype=torch.float64)
    m_exact = gm.mmse(sig, n_mc=args.mc, generator=torch.Generator().manual_seed(1))
    t0 = time.perf_counter()
    sig_pass, m_pass = estimate_mmse(loaded.denoiser, lambda n, g: gm.sample(n, generator=g).float(),
                                     n_levels=args.levels, n_pairs=args.pairs, sigma_min=smin, sigma_max=smax,
                                     progress=False)
    print(f"dedicated pass ({args.levels} levels x {args.pairs} pairs): {time.perf_counter() - t0:.1f} s", flush=True)
    kind = "rescaled_entropic"
    schedules = {
        "exact": EntropicSchedule.from_mmse(sig, m_exact, kind=kind, dim=gm.dim),
        "head": head_schedule_of_checkpoint(loaded.denoiser, meta, kind),
        "head_all": head_schedule(loaded.denoiser, kind=kind, sigma_min=smin, sigma_max=smax, trusted=(smin, smax),
                                  dim=gm.dim),
        "tracker": with_kind(loaded.schedule, kind),
        "pass": EntropicSchedule.from_mmse(sig_pass, m_pass, kind=kind, dim=gm.dim),
    }
    return loaded, gm, schedules


def q_table(schedules: dict[str, EntropicSchedule], trusted: tuple[float, float]) -> list[str]:
    s = torch.tensor(PROBE_SIGMAS, dtype=torch.float64)
    q = {name: sch.mmse(s) * edm_loss_weight(s, sch.sigma_data) for name, sch in schedules.items()}
    lines = ["| σ | trusted | q_exact | " + " | ".join(f"{n} / exact" for n in SOURCES[1:]) + " |",
             "|---|---|---|" + "---|" * (len(SOURCES) - 1)]
    for i, sigma in enumerate(PROBE_SIGMAS):
        inside = "yes" if trusted[0] <= sigma <= trusted[1] else "no"
        ratios = " | ".join(f"{(q[n][i] / q['exact'][i]).item():.3f}" for n in SOURCES[1:])
        lines.append(f"| {sigma:g} | {inside} | {q['exact'][i].item():.4g} | {ratios} |")
    return lines


def grid_distance(a: EntropicSchedule, b: EntropicSchedule, kind: str, n: int, smin: float, smax: float) -> float:
    """max |Δ ln σ| between the n-step `kind` grids of two curves."""
    ga, gb = (with_kind(x, kind).sigmas(n, smin, smax).log() for x in (a, b))
    return (ga - gb).abs().max().item()


def grid_table(schedules: dict[str, EntropicSchedule], nfes: list[int], smin: float, smax: float) -> list[str]:
    lines = ["| kind | NFE (steps) | " + " | ".join(SOURCES[1:]) + " |", "|---|---|" + "---|" * (len(SOURCES) - 1)]
    for kind in ("rescaled_entropic", "entropic"):
        for n in nfes:
            cells = [f"{grid_distance(schedules[s], schedules['exact'], kind, n, smin, smax):.3f}" for s in SOURCES[1:]]
            lines.append(f"| {kind} | {n} | " + " | ".join(cells) + " |")
    return lines


def trust_table(loaded, exact: EntropicSchedule, nfes: list[int], ks: list[float]) -> list[str]:
    """max |Δ ln σ| of the head's grids from the exact ones for trusted ranges exp(P_mean ± k P_std)."""
    meta = loaded.meta
    loss, smin, smax = meta["config"]["loss"], meta["sigma_min"], meta["sigma_max"]
    kinds = ("rescaled_entropic", "entropic")
    lines = ["| k | trusted σ | " + " | ".join(f"{kind} {n}" for kind in kinds for n in nfes) + " |",
             "|---|---|" + "---|" * (len(kinds) * len(nfes))]
    for k in ks:
        lo, hi = trusted_range(loss["P_mean"], loss["P_std"], smin, smax, k)
        head = head_schedule(loaded.denoiser, kind="rescaled_entropic", sigma_min=smin, sigma_max=smax,
                             trusted=(lo, hi))
        cells = [f"{grid_distance(head, exact, kind, n, smin, smax):.3f}" for kind in kinds for n in nfes]
        lines.append(f"| {k:g} | [{lo:.3g}, {hi:.3g}] | " + " | ".join(cells) + " |")
    return lines


def quality_table(args, loaded, gm, schedules) -> list[str]:
    meta = loaded.meta
    smin, smax = meta["sigma_min"], meta["sigma_max"]
    shape = tuple(meta["sample_shape"])
    indices = torch.arange(args.samples)
    noise, _ = initial_noise(indices, shape, seed=0)
    x_T = noise.to(torch.float64) * smax
    exact_end = gm.ode_solve(x_T, smax, smin, n_steps=args.ode_steps)
    fresh_mu, fresh_cov = gaussian_fit(gm.sample(args.fresh, generator=torch.Generator().manual_seed(1)))
    floor = frechet_distance(*gaussian_fit(exact_end), fresh_mu, fresh_cov)
    lines = [f"FD of the exact ODE endpoints (floor): {floor:.4g}", "",
             "| denoiser | solver | NFE | " + " | ".join(f"{s} FD / RMSE" for s in [*SOURCES, "logsnr"]) + " |",
             "|---|---|---|" + "---|" * (len(SOURCES) + 1)]
    denoisers = {"edm2 mlp": (loaded.denoiser, torch.float32), "exact": (gm.denoise, torch.float64)}
    for name, (den, dtype) in denoisers.items():
        for solver in args.solvers:
            for n in args.nfe:
                cells = []
                for source in [*SOURCES, "logsnr"]:
                    spec = EvalSpec(solver, "logsnr" if source == "logsnr" else "rescaled_entropic", n)
                    sigmas = spec.sigmas(smin, smax, schedules.get(source))
                    x = generate(den, indices, shape, solver=solver, sigmas=sigmas, seed=0, batch_size=args.samples,
                                 dtype=dtype).to(torch.float64)
                    fd = frechet_distance(*gaussian_fit(x), fresh_mu, fresh_cov)
                    cells.append(f"{fd:.3g} / {(x - exact_end).square().mean().sqrt().item():.3g}")
                lines.append(f"| {name} | {solver} | {n} | " + " | ".join(cells) + " |")
                print(lines[-1], flush=True)
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("benchmarks/runs/gmm_edm2"))
    p.add_argument("--levels", type=int, default=128, help="σ levels of the exact curve and of the dedicated pass")
    p.add_argument("--pairs", type=int, default=1024, help="(x0, noise) pairs of the dedicated pass")
    p.add_argument("--mc", type=int, default=8192, help="Monte-Carlo samples of the exact MMSE")
    p.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    p.add_argument("--solvers", nargs="+", default=["dpmpp_2m", "evodiff_consistent"])
    p.add_argument("--samples", type=int, default=2048)
    p.add_argument("--fresh", type=int, default=65536)
    p.add_argument("--ode-steps", type=int, default=1000)
    p.add_argument("--out", type=Path, default=Path("benchmarks/results/head_schedule_gmm.md"))
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded, gm, schedules = curves(args)
    meta = loaded.meta
    loss = meta["config"]["loss"]
    trusted = trusted_range(loss["P_mean"], loss["P_std"], meta["sigma_min"], meta["sigma_max"])
    text = ["# EDM2 head schedule on the 64-d Gaussian mixture\n",
            f"Checkpoint `{loaded.path}` ({meta.get('images_seen')} training images; EMA = first power profile). "
            f"Head trusted on σ ∈ [{trusted[0]:.4g}, {trusted[1]:.4g}] (exp(P_mean ± 2.5 P_std), P_mean "
            f"{loss['P_mean']}, P_std {loss['P_std']}).\n",
            f"Command: `PYTHONPATH=. python {' '.join(sys.argv)}`\n",
            "## q(σ) = λ(σ)·m(σ) of each source relative to the exact one\n", *q_table(schedules, trusted), "",
            "## max |Δ ln σ| from the exact schedule's grid\n",
            *grid_table(schedules, args.nfe, meta["sigma_min"], meta["sigma_max"]), "",
            "## The head's trusted range exp(P_mean ± k P_std): max |Δ ln σ| from the exact grids\n",
            *trust_table(loaded, schedules["exact"], args.nfe, [1.5, 2, 2.5, 3, 3.5]), "",
            "## Sample quality (rescaled entropic grids; logsnr for reference): FD to data / RMSE to the exact ODE "
            "endpoint\n"]
    print("\n".join(text), flush=True)
    text += quality_table(args, loaded, gm, schedules)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(text) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
