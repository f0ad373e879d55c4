"""The charts of a training run: the loss per noise level and the learned schedule on log-σ axes beside the training
density p(σ), the training and EMA losses on one chart, and the NFE grid of the schedule as scalars (one W&B line per
grid point against kimg, so the schedule's evolution over training is a chart)."""

from __future__ import annotations

import math
from typing import Sequence

import torch
from matplotlib.figure import Figure
from torch import Tensor

from evodiff_pl.schedules.entropic import EntropicSchedule, edm_loss_weight
from evodiff_pl.schedules.grids import karras
from evodiff_pl.schedules.tracker import SigmaBinnedLoss

TRACKED = {"ema_eval": "EMA network (eval mode, un-augmented)", "train_loss": "trained network (training batches)"}
"""What the σ-binned tracker records, by `entropic.source`."""


def lognormal_density(sigma: Tensor, P_mean: float, P_std: float) -> Tensor:
    """p(ln σ) of the training σ: ln σ ~ N(P_mean, P_std²) (EDM Table 1, "Noise distribution")."""
    z = (sigma.log() - P_mean) / P_std
    return torch.exp(-0.5 * z.square()) / (P_std * math.sqrt(2 * math.pi))


def _density_panel(ax, sigma: Tensor, P_mean: float, P_std: float, counts: Tensor | None = None) -> None:
    """p(ln σ) of training on a log-σ axis; with `counts`, the tracker's samples per bin as a density in ln σ too."""
    ax.semilogx(sigma, lognormal_density(sigma, P_mean, P_std), "-", label=f"training p(ln σ): N({P_mean:g}, {P_std:g}²)")
    if counts is not None and float(counts.sum()) > 0:
        width = float(sigma[1].log() - sigma[0].log()) if len(sigma) > 1 else 1.0
        ax.semilogx(sigma, counts / (counts.sum() * width), ".", ms=3, label="tracker samples (density in ln σ)")
    ax.set_xlabel("σ")
    ax.set_ylabel("density")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)


def plot_loss_curve(tracker: SigmaBinnedLoss, source: str, P_mean: float, P_std: float) -> Figure:
    """The tracked loss q = λ(σ)·MSE and the x0-space MSE per σ (log-log), the training density below."""
    sigma, q, counts = tracker.bin_centers(), tracker.mean_q(), tracker.counts()
    fig = Figure(figsize=(6, 5.5))
    ax_q, ax_p = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax_q.loglog(sigma, q, "o-", ms=3, label="q = λ(σ)·MSE (loss)")
    # m = q / λ(σ)  (docs/method.md §3)
    ax_q.loglog(sigma, q / edm_loss_weight(sigma, tracker.sigma_data), "s-", ms=3, label="MSE in x0 space")
    ax_q.set_ylabel("per-dimension error")
    ax_q.legend()
    ax_q.grid(True, which="both", alpha=0.3)
    ax_q.set_title(f"loss per noise level of the {TRACKED.get(source, source)}, {tracker.steps} steps", fontsize=9)
    _density_panel(ax_p, sigma, P_mean, P_std, counts)
    fig.tight_layout()
    return fig


def plot_schedule(schedule: EntropicSchedule, sigma_min: float, sigma_max: float, nfe: int, P_mean: float,
                  P_std: float) -> Figure:
    """The learned time τ(σ) on a log-σ axis with its `nfe`-step grid, Karras ρ=7 for reference, p(σ) below."""
    tau = [1 - j / 256 for j in range(257)]
    steps = schedule.sigmas(nfe, sigma_min, sigma_max)
    fig = Figure(figsize=(6, 5.5))
    ax, ax_p = fig.subplots(2, 1, sharex=True, height_ratios=(3, 1))
    ax.semilogx(schedule.sigmas(256, sigma_min, sigma_max), tau, "-", label=schedule.kind)
    ax.semilogx(steps, [1 - j / nfe for j in range(nfe + 1)], "o", label=f"{nfe} steps")
    ax.semilogx(karras(256, sigma_min, sigma_max), tau, "--", alpha=0.6, label="karras ρ=7")
    ax.set_ylabel(f"{schedule.kind.replace('_', ' ')} time τ")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"learned schedule, {nfe} steps: " + ", ".join(f"{s:.3g}" for s in steps.tolist()), fontsize=7)
    _density_panel(ax_p, torch.logspace(math.log10(sigma_min), math.log10(sigma_max), 200), P_mean, P_std)
    fig.tight_layout()
    return fig


def plot_losses(history: Sequence[tuple[float, str, float]]) -> Figure:
    """Per-element loss against kimg: the trained network on its training batches and the EMA network on the fixed
    validation batch (held-out with data.holdout), from (kimg, metric, value) rows."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for metric, label in (("train/loss_per_elem", "trained network, training batches (train/loss_per_elem)"),
                          ("val/loss_ema_per_elem", "EMA network, validation batch (val/loss_ema_per_elem)")):
        rows = [(k, v) for k, m, v in history if m == metric]
        if rows:
            ax.semilogy(*zip(*rows), ".-" if metric.startswith("val") else "-", label=label)
    ax.set_xlabel("kimg")
    ax.set_ylabel("loss per element")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title("training loss (trained network) and EMA loss", fontsize=9)
    fig.tight_layout()
    return fig


def grid_scalars(prefix: str, schedule: EntropicSchedule, nfe: int, sigma_min: float, sigma_max: float
                 ) -> dict[str, float]:
    """The interior points σ_1..σ_{nfe-1} of the schedule's `nfe`-step grid (σ_0 = σ_max, σ_nfe = σ_min are fixed),
    as `<prefix>/nfe<nfe>/sigma_<i>`."""
    grid = schedule.sigmas(nfe, sigma_min, sigma_max).tolist()
    return {f"{prefix}/nfe{nfe}/sigma_{i}": float(grid[i]) for i in range(1, nfe)}


def curve_tables(tracker: SigmaBinnedLoss, schedule: EntropicSchedule, sigma_min: float, sigma_max: float
                 ) -> dict[str, tuple[list[str], list[list[float]]]]:
    """The loss per σ and the learned schedule as (columns, rows), x first: tables that overlay across runs."""
    sigma, q, counts = tracker.bin_centers(), tracker.mean_q(), tracker.counts()
    # m = q / λ(σ)  (docs/method.md §3)
    mse = q / edm_loss_weight(sigma, tracker.sigma_data)
    loss_rows = [[float(s), float(a), float(b), float(n)] for s, a, b, n in zip(sigma, q, mse, counts)]
    tau = [1 - j / 256 for j in range(257)]
    grid = schedule.sigmas(256, sigma_min, sigma_max).tolist()
    return {
        "entropic/loss_per_sigma": (["sigma", "loss", "mse_x0", "samples"], loss_rows),
        "entropic/schedule": (["sigma", "tau"], [[float(s), t] for t, s in zip(tau, grid)]),
    }
