"""Noise-level grids sigma_max = sigma_0 > ... > sigma_N = sigma_min, one registry for all of them."""

from __future__ import annotations

import math
from typing import Callable, Protocol

import torch
from torch import Tensor


class LearnedSchedule(Protocol):
    """Anything that places n_steps + 1 levels itself (e.g. `evodiff_pl.schedules.entropic.EntropicSchedule`)."""

    kind: str

    def sigmas(self, n_steps: int, sigma_min: float, sigma_max: float) -> Tensor: ...


def karras(n_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> Tensor:
    """EDM eq. (5): sigma_i = (sigma_max^(1/rho) + i/N (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho."""
    ramp = torch.linspace(0, 1, n_steps + 1, dtype=torch.float64)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return (hi + ramp * (lo - hi)) ** rho


def logsnr(n_steps: int, sigma_min: float, sigma_max: float) -> Tensor:
    """Uniform in log-SNR lambda = -ln sigma (DPM-Solver's time-uniform-lambda grid)."""
    return torch.linspace(math.log(sigma_max), math.log(sigma_min), n_steps + 1, dtype=torch.float64).exp()


HEAD_PREFIX = "head_"
"""Schedule names with this prefix are built from an EDM2 network's log-variance head (`evodiff_pl.schedules.head`)."""


def from_head(name: str) -> bool:
    """Whether schedule `name` is read off the network's log-variance head rather than the tracked loss."""
    return name.startswith(HEAD_PREFIX)


def learned_kind(name: str) -> str:
    """The EntropicSchedule kind (entropic or rescaled_entropic) of a learned schedule name."""
    return name[len(HEAD_PREFIX):] if from_head(name) else name


def _learned(name: str) -> Callable[..., Tensor]:
    kind = learned_kind(name)

    def grid(n_steps: int, sigma_min: float, sigma_max: float, schedule: LearnedSchedule | None = None) -> Tensor:
        if schedule is None:
            raise ValueError(f"schedule {name!r} needs a learned schedule: get_sigmas({name!r}, n, schedule=...)"
                             " (an EntropicSchedule, e.g. from a checkpoint's schedule file)")
        if schedule.kind != kind:
            raise ValueError(f"schedule {name!r} was asked for but the given schedule is {schedule.kind!r}")
        return schedule.sigmas(n_steps, sigma_min=sigma_min, sigma_max=sigma_max)

    source = "an EDM2 network's log-variance head" if from_head(name) else "a denoiser's per-level loss"
    grid.__doc__ = f"The {kind} schedule learned from {source} (docs/method.md §3)."
    return grid


def tuned(n_steps: int, sigma_min: float, sigma_max: float, schedule: LearnedSchedule | None = None) -> Tensor:
    """A grid tuned for one solver (`evodiff_pl.schedules.tuned`, docs/method.md §2.7): `schedule` is
    `TunedGrids.for_solver(solver)`, which holds one grid per NFE."""
    if getattr(schedule, "kind", None) != "tuned":
        raise ValueError("schedule 'tuned' needs a solver's tuned grids: get_sigmas('tuned', n, schedule="
                         "TunedGrids.for_solver(solver)) (made by sample.py tune=true or a .../tuned/... "
                         "evaluation spec during training)")
    return schedule.sigmas(n_steps, sigma_min=sigma_min, sigma_max=sigma_max)


SCHEDULES: dict[str, Callable[..., Tensor]] = {
    "karras": karras,
    "logsnr": logsnr,
    "entropic": _learned("entropic"),
    "rescaled_entropic": _learned("rescaled_entropic"),
    "head_entropic": _learned("head_entropic"),
    "head_rescaled_entropic": _learned("head_rescaled_entropic"),
    "tuned": tuned,
}


def get_sigmas(name: str, n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, **options) -> Tensor:
    """n_steps + 1 decreasing float64 levels from sigma_max to sigma_min, both ends exact.

    Options: `rho` for karras; `schedule` (a learned schedule object) for entropic / rescaled_entropic, a solver's
    tuned grids for tuned.
    """
    if name not in SCHEDULES:
        raise ValueError(f"unknown schedule {name!r}; valid: {', '.join(SCHEDULES)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    if not 0 < sigma_min < sigma_max:
        raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
    sigmas = SCHEDULES[name](n_steps, sigma_min, sigma_max, **options).to(torch.float64)
    sigmas[0], sigmas[-1] = sigma_max, sigma_min
    return sigmas
