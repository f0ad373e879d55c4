"""Tuning the grids of a network for its solvers (`evodiff_pl.tuning`) on fixed starting noises whose seeds are
never scored: the validation callback's `solver/tuned/NFE` specs and `sample.py tune=true` share it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from evodiff_pl.evaluation.metrics import DataMoments
from evodiff_pl.sampling.generate import initial_noise, steps_for_nfe
from evodiff_pl.sampling.plan import with_kind
from evodiff_pl.schedules.grids import LearnedSchedule, get_sigmas
from evodiff_pl.schedules.tuned import TunedGrids
from evodiff_pl.tuning import OBJECTIVES, reference_solution, tune_sigmas
from evodiff_pl.utils.dist import world
from evodiff_pl.utils.stop import STOP, raise_if_stopped, stoppable

TUNE_SEED = 1 << 31
"""Base seed of the tuning noises: tuning sample j draws from seed TUNE_SEED + j, never a scoring seed (seed + j
with a small base seed and j < the number of scored samples)."""


def learned_start(schedule: LearnedSchedule, sigma_min: float, sigma_max: float) -> Callable[[str, int], Tensor]:
    """start(solver, nfe): the rescaled entropic grid of the learned `schedule` (an EntropicSchedule) for that NFE."""
    rescaled = with_kind(schedule, "rescaled_entropic")
    return lambda solver, count: get_sigmas("rescaled_entropic", steps_for_nfe(solver, count), sigma_min, sigma_max,
                                            schedule=rescaled)


def tuning_noise(n: int, shape: tuple[int, ...], sigma_max: float, num_classes: int = 0,
                 device: torch.device | str = "cpu") -> tuple[Tensor, Tensor | None]:
    """The fixed starting noises x_T = sigma_max * noise of seeds TUNE_SEED + j, j < n, and their labels."""
    noise, labels = initial_noise(torch.arange(n), shape, TUNE_SEED, num_classes)
    return (sigma_max * noise).to(device), None if labels is None else labels.to(device)


class _Abandoned(Exception):
    """A stop signal reached this rank while it tuned a grid."""


def tune_grids(
    wanted: Sequence[tuple[str, int]],
    denoiser: Callable[..., Tensor],
    x_T: Tensor,
    start: Callable[[str, int], Tensor],
    *,
    labels: Tensor | None = None,
    previous: TunedGrids | None = None,
    objective: str = "fd",
    max_evals: int = 100,
    reference_steps: int = 200,
    data: DataMoments | None = None,
    source: dict[str, Any] | None = None,
) -> TunedGrids:
    """Tune every (solver, NFE) of `wanted` (call on every rank: rank r tunes wanted[r::world], all gather).

    A stop signal abandons the grid a signalled rank is tuning at its next denoiser call; the ranks then raise
    `evodiff_pl.utils.stop.Stopped` together (before the next grid or at the end), returning nothing half-tuned.

    Each starts from `previous`'s grid when it has one with `start`'s ends, else from `start(solver, nfe)` (e.g.
    the learned rescaled entropic grid); `denoiser` is D(x, sigma[, labels]); x_T from `tuning_noise`. The objective
    fd_data compares with `data` (the score's moments, `FrechetScore.moments()`) and computes no reference.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown tuning objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if objective == "fd_data" and data is None:
        raise ValueError("the tuning objective fd_data needs the data's moments (data=)")
    rank, world_size = world()
    def fn(x: Tensor, sigma: Tensor) -> Tensor:
        if STOP.received:
            raise _Abandoned
        return denoiser(x, sigma) if labels is None else denoiser(x, sigma, labels)

    mine: dict[str, list[float]] = {}
    reference = None
    with torch.no_grad():
        for solver, count in stoppable(list(wanted)[rank::world_size], "the schedule tuning"):
            first = start(solver, count)
            warm = None if previous is None else previous.get(solver, count)
            fits = warm is not None and warm.numel() == first.numel() and bool((warm[[0, -1]] == first[[0, -1]]).all())
            try:
                if reference is None and objective != "fd_data":
                    reference = reference_solution(fn, x_T, first[0].item(), first[-1].item(), steps=reference_steps)
                grid = tune_sigmas(solver, fn, x_T, warm if fits else first, reference=reference,
                                   objective=objective, data=data, nfe=count, max_evals=max_evals)
            except _Abandoned:
                continue  # the next check (collective) stops every rank
            mine[f"{solver}/{count}"] = grid.tolist()
    raise_if_stopped("the schedule tuning")
    if world_size > 1:
        shares: list[Any] = [None] * world_size
        dist.all_gather_object(shares, mine)
        mine = {k: v for share in shares for k, v in share.items()}
    merged = {} if previous is None else {k: v.tolist() for k, v in previous.grids.items()}
    merged.update(mine)
    return TunedGrids(merged, objective=objective,
                      source={**(source or {}), "tune_samples": len(x_T), "max_evals": max_evals,
                              "reference_steps": 0 if objective == "fd_data" else reference_steps})
