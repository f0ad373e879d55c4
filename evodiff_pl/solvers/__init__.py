"""Probability-flow ODE solvers and two stochastic samplers over a given sigma grid (docs/method.md §2).

Every solver is a pure function ``(denoiser, x, sigmas, *, options) -> Tensor`` (the contract is
spelled out in `evodiff_pl.solvers.base`) that carries its exact call count as ``fn.nfe_rule``;
``SOLVERS`` is the one registry of them, by name. The stochastic ones (edm_stochastic,
dpmpp_2m_sde) take ``noise=``, a per-sample noise source (`seeded_noise`, `per_sample_noise`).
"""

from __future__ import annotations

import inspect
from typing import Callable

from torch import Tensor

from evodiff_pl.solvers.base import Callback, Denoiser, Noise, per_sample_noise, seeded_noise
from evodiff_pl.solvers.dpmpp import dpmpp_2m, dpmpp_2m_sde, dpmpp_3m
from evodiff_pl.solvers.edm import edm_stochastic, euler, heun
from evodiff_pl.solvers.evodiff import evodiff
from evodiff_pl.solvers.evodiff_consistent import evodiff_consistent
from evodiff_pl.solvers.ipndm import ipndm
from evodiff_pl.solvers.unipc import unipc

__all__ = [
    "SOLVERS", "STOCHASTIC", "Callback", "Denoiser", "Noise", "nfe", "solve", "per_sample_noise", "seeded_noise",
    "dpmpp_2m", "dpmpp_3m", "euler", "heun", "evodiff", "evodiff_consistent", "unipc", "ipndm", "edm_stochastic",
    "dpmpp_2m_sde",
]

SOLVERS: dict[str, Callable[..., Tensor]] = {
    fn.__name__: fn
    for fn in (euler, heun, dpmpp_2m, dpmpp_3m, evodiff, evodiff_consistent, unipc, ipndm, edm_stochastic, dpmpp_2m_sde)
}
STOCHASTIC = frozenset(name for name, fn in SOLVERS.items() if "noise" in inspect.signature(fn).parameters)


def _get(name: str) -> Callable[..., Tensor]:
    if name not in SOLVERS:
        raise ValueError(f"unknown solver {name!r}; valid: {', '.join(SOLVERS)}")
    return SOLVERS[name]


def solve(name: str, denoiser: Denoiser, x: Tensor, sigmas: Tensor, **options) -> Tensor:
    """Run solver `name` from x at sigmas[0] down to sigmas[-1]; options as documented per solver."""
    return _get(name)(denoiser, x, sigmas, **options)


def nfe(name: str, n_steps: int, **options) -> int:
    """Exact number of denoiser calls of `solve(name, ...)` on a grid of n_steps + 1 levels."""
    fn = _get(name)
    valid = [k for k, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise TypeError(f"{name}: unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    if not isinstance(n_steps, int) or n_steps < 1:
        raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
    return fn.nfe_rule(n_steps, **options) + bool(options.get("denoise_to_zero", False))
