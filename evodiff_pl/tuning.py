"""A noise-level grid tuned for one solver: its interior levels moved so that the solver lands near an
accurate solution of the probability-flow ODE from the same starting noise (docs/method.md §2.7).

`tune_sigmas` is a pure function (no Lightning, no communication): derivative-free Nelder-Mead over the
log-gaps of the grid, so any denoiser and any deterministic solver work as they are. Everything runs in a
fixed order on the given tensors, so the same inputs give the same grid bit for bit; on N ranks, pass every
rank the same x_T (e.g. drawn from fixed seeds) and each ends with the same grid without any all-reduce.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from evodiff_pl.evaluation.metrics import DataMoments, frechet_distance, gaussian_fit
from evodiff_pl.schedules import logsnr
from evodiff_pl.solvers import SOLVERS, STOCHASTIC, Denoiser, nfe, solve

Objective = Callable[[Tensor, Tensor], float]


def per_sample_rmse(x: Tensor, reference: Tensor) -> Tensor:
    """RMSE over each sample's entries (B,), in float64."""
    return (x.double() - reference.double()).reshape(x.shape[0], -1).square().mean(1).sqrt()


def median_rmse(x: Tensor, reference: Tensor) -> float:
    """Median per-sample RMSE: a few samples that switch mode on a coarse grid do not steer the grid."""
    return per_sample_rmse(x, reference).median().item()


def slack_rmse(slack: float) -> Objective:
    """LD3's slack (Tong et al. 2024, docs/method.md §2.7) in endpoint space: mean_i max(0, d_i - r)."""

    def objective(x: Tensor, reference: Tensor) -> float:
        return (per_sample_rmse(x, reference) - slack).clamp(min=0).mean().item()

    return objective


def fd_to_reference(x: Tensor, reference: Tensor) -> float:
    """Fréchet distance between Gaussians fitted to the solver's endpoints and to the reference endpoints."""
    return frechet_distance(*gaussian_fit(x.double().reshape(x.shape[0], -1)),
                            *gaussian_fit(reference.double().reshape(x.shape[0], -1)))


def fd_to_data(data: DataMoments) -> Objective:
    """The Fréchet distance of the endpoints' features to the data's moments (the score itself, on the tuning
    noises); it needs no reference solution and ignores the `reference` argument."""

    def objective(x: Tensor, reference: Tensor | None) -> float:
        return frechet_distance(*gaussian_fit(data.features(x).double().reshape(x.shape[0], -1)),
                                data.mean.double().cpu(), data.cov.double().cpu())

    return objective


OBJECTIVES = ("rmse", "slack", "fd", "fd_data")
"""Named objectives: median per-sample RMSE; LD3's slack (r = `slack`, default half the starting grid's median
RMSE); the Fréchet distance of the endpoint distributions (fd: to the reference endpoints; fd_data: to the data's
moments, `data=`, no reference solution). Any callable (x, reference) -> float also works."""


def reference_solution(
    denoiser: Denoiser, x_T: Tensor, sigma_max: float, sigma_min: float, *, steps: int = 200, solver: str = "ipndm"
) -> Tensor:
    """An accurate ODE endpoint from x_T: `solver` on `steps` log-SNR-uniform levels.

    On the exact mixture the default (iPNDM, 200 steps) is within 1.8e-5 median / 4.5e-4 max per-sample RMSE of
    the exact endpoint (128 samples), far below few-step errors (> 2e-3 at NFE 5, tuned).
    """
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = logsnr(steps, sigma_min, sigma_max)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return solve(solver, denoiser, x_T, sigmas)


def grid_from_logits(z: Tensor, sigma_max: float, sigma_min: float) -> Tensor:
    """Levels with ln-sigma gaps L softmax([0, z]), L = ln(sigma_max / sigma_min), ends exact.

    Decreasing for any z unless a gap rounds to zero in float64 (|z| >~ 30); `tune_sigmas` scores such grids inf.
    """
    gaps = torch.softmax(torch.cat([z.new_zeros(1), z]), 0) * math.log(sigma_max / sigma_min)
    sigmas = (math.log(sigma_max) - torch.cat([gaps.new_zeros(1), gaps.cumsum(0)])).exp()
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas


def logits_from_grid(sigmas: Tensor) -> Tensor:
    """The inverse of `grid_from_logits`: log-gap differences to the first gap."""
    gaps = (sigmas[:-1] / sigmas[1:]).log()
    return (gaps[1:] / gaps[0]).log()


def nelder_mead(f: Callable[[Tensor], float], z0: Tensor, *, step: float, max_evals: int, tol: float) -> Tensor:
    """Minimise f from z0 (Nelder & Mead 1965, standard coefficients 1, 2, 1/2, 1/2), restarting from the best
    point with a fresh simplex of half the previous size until a restart no longer improves by tol or
    max_evals is spent (coarse to fine: the landscape has several local minima)."""
    evals, best, f_best = 0, z0, f(z0)
    while evals < max_evals:
        n = best.numel()
        simplex = [best] + [best + step * torch.eye(n, dtype=best.dtype)[j] for j in range(n)]
        values = [f_best] + [f(p) for p in simplex[1:]]
        evals += n + 1
        while evals < max_evals:
            order = sorted(range(n + 1), key=lambda k: (values[k], k))
            simplex, values = [simplex[k] for k in order], [values[k] for k in order]
            if values[-1] - values[0] <= tol * (abs(values[0]) + 1e-300):
                break
            centre = torch.stack(simplex[:-1]).mean(0)
            reflected = centre + (centre - simplex[-1])
            f_r = f(reflected)
            evals += 1
            if f_r < values[0]:
                expanded = centre + 2 * (centre - simplex[-1])
                f_e = f(expanded)
                evals += 1
                simplex[-1], values[-1] = (expanded, f_e) if f_e < f_r else (reflected, f_r)
            elif f_r < values[-2]:
                simplex[-1], values[-1] = reflected, f_r
            else:
                inside = f_r >= values[-1]
                contracted = centre + 0.5 * ((simplex[-1] if inside else reflected) - centre)
                f_c = f(contracted)
                evals += 1
                if f_c < min(f_r, values[-1]):
                    simplex[-1], values[-1] = contracted, f_c
                else:
                    simplex = [simplex[0]] + [simplex[0] + 0.5 * (p - simplex[0]) for p in simplex[1:]]
                    values = [values[0]] + [f(p) for p in simplex[1:]]
                    evals += n
        k = min(range(n + 1), key=lambda j: (values[j], j))
        step *= 0.5
        improved = values[k] < f_best - tol * abs(f_best)
        if values[k] < f_best:
            best, f_best = simplex[k], values[k]
        if not improved:
            break
    return best


def _check(solver: str, x_T: Tensor, sigmas: Tensor, target_nfe: int | None, solver_options: dict) -> Tensor:
    if solver not in SOLVERS:
        raise ValueError(f"unknown solver {solver!r}; valid: {', '.join(SOLVERS)}")
    if solver in STOCHASTIC:
        raise ValueError(f"{solver} is stochastic; tune_sigmas needs a deterministic solver (its endpoint must be "
                         "a function of x_T and the grid)")
    if not isinstance(x_T, Tensor) or x_T.ndim < 2 or x_T.shape[0] == 0:
        raise ValueError(f"x_T must be a non-empty batch of shape (B, ...), got {getattr(x_T, 'shape', x_T)!r}")
    if not torch.isfinite(x_T).all():
        raise ValueError("x_T has non-finite entries")
    s = torch.as_tensor(sigmas).detach().to("cpu", torch.float64)
    if s.ndim != 1 or s.numel() < 2 or not torch.isfinite(s).all() or (s <= 0).any() or (s[1:] >= s[:-1]).any():
        raise ValueError("sigmas must be a 1-D grid of at least 2 finite levels > 0, strictly decreasing from "
                         f"sigma_max to sigma_min; got {s.tolist()}")
    try:
        calls = nfe(solver, s.numel() - 1, **solver_options)
    except TypeError as err:
        raise ValueError(str(err)) from None
    if target_nfe is not None and calls != target_nfe:
        raise ValueError(f"{solver} makes {calls} denoiser calls on a grid of {s.numel()} levels, not nfe="
                         f"{target_nfe} (evodiff_pl.sampling.generate.steps_for_nfe gives the steps for an NFE)")
    return s


def tune_sigmas(
    solver: str,
    denoiser: Denoiser,
    x_T: Tensor,
    sigmas: Tensor,
    *,
    reference: Tensor | None = None,
    objective: str | Objective = "rmse",
    slack: float | None = None,
    data: DataMoments | None = None,
    nfe: int | None = None,
    max_evals: int = 400,
    step: float = 1.0,
    tol: float = 1e-4,
    **solver_options,
) -> Tensor:
    """The grid of len(sigmas) levels, ends unchanged, that minimises `objective` for `solver` (float64, CPU).

    solver, **solver_options: as for `evodiff_pl.solvers.solve` (deterministic solvers only).
    denoiser: D(x, sigma), e.g. the EMA network in eval mode (called under torch.no_grad()).
    x_T: the fixed starting noises (B, ...) at sigmas[0], i.e. sigma_max * N(0, I), on the denoiser's device.
    sigmas: the starting grid (e.g. the learned rescaled entropic grid); strictly decreasing.
    reference: the accurate endpoints from x_T (default `reference_solution(denoiser, x_T, ...)`).
    objective: "rmse" | "slack" | "fd" | "fd_data" (see `OBJECTIVES`), or a callable (x, reference) -> float.
    slack: LD3's radius r for "slack", in per-sample RMSE units (default half the starting median RMSE).
    data: the data's feature moments for "fd_data" (e.g. `FrechetScore.moments()`); no reference is computed.
    nfe: if given, the NFE the grid must give the solver (ValueError otherwise).
    max_evals, step, tol: Nelder-Mead's budget of solver runs, initial simplex size (in log-gap logits) and
        relative tolerance. The best grid seen never scores worse than the starting one.
    """
    s = _check(solver, x_T, sigmas, nfe, solver_options)
    if s.numel() <= 2:
        return s.clone()
    sigma_max, sigma_min = s[0].item(), s[-1].item()
    if objective == "fd_data" and data is None:
        raise ValueError("objective fd_data needs data= (the data's feature moments, e.g. FrechetScore.moments())")
    with torch.no_grad():
        if reference is None and objective != "fd_data":
            reference = reference_solution(denoiser, x_T, sigma_max, sigma_min)
        if reference is not None and (reference.shape != x_T.shape or not torch.isfinite(reference).all()):
            raise ValueError(f"reference must be finite with x_T's shape {tuple(x_T.shape)}")
        if callable(objective):
            loss = objective
        elif objective == "fd_data":
            loss = fd_to_data(data)
        elif objective == "rmse":
            loss = median_rmse
        elif objective == "fd":
            loss = fd_to_reference
        elif objective == "slack":
            r = 0.5 * median_rmse(solve(solver, denoiser, x_T, s, **solver_options), reference) if slack is None \
                else slack
            loss = slack_rmse(r)
        else:
            raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)} or a callable")

        def f(z: Tensor) -> float:
            grid = grid_from_logits(z, sigma_max, sigma_min)
            if (grid[1:] >= grid[:-1]).any():
                return math.inf
            x = solve(solver, denoiser, x_T, grid, **solver_options)
            value = loss(x, reference) if torch.isfinite(x).all() else math.inf
            return value if math.isfinite(value) else math.inf

        z = nelder_mead(f, logits_from_grid(s), step=step, max_evals=max_evals, tol=tol)
    return grid_from_logits(z, sigma_max, sigma_min)
