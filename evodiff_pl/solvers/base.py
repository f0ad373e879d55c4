"""What every solver shares: the call contract, grid validation, the DDIM step and the NFE rule.

A solver is a pure function ``(denoiser, x, sigmas, *, options) -> Tensor`` in the VE/EDM
parameterisation x_sigma = x_0 + sigma * eps, where ``denoiser(x, sigma)`` is the data prediction
D(x, sigma) and ``sigma`` has shape (B,). ``sigmas`` runs from sigma_max down to sigma_min > 0 (no
trailing zero); the solver steps through each consecutive pair and returns the state at
``sigmas[-1]``. Step coefficients are computed in float64 from the grid and applied in x's dtype.
"""

from __future__ import annotations

from typing import Callable, Literal, Sequence, TypeVar

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], None]
Noise = Callable[[Tensor], Tensor]
LowerOrderFinal = bool | Literal["auto"]
NfeRule = Callable[..., int]
F = TypeVar("F", bound=Callable[..., Tensor])


def counts_nfe(rule: NfeRule) -> Callable[[F], F]:
    """Attach the solver's exact call count: ``rule(n_steps, **options)`` for a grid of n_steps + 1 levels."""

    def attach(fn: F) -> F:
        fn.nfe_rule = rule  # type: ignore[attr-defined]
        return fn

    return attach


def one_per_step(n_steps: int, **_: object) -> int:
    return n_steps


def lowers_last_steps(lower_order_final: LowerOrderFinal, n_steps: int) -> bool:
    """Whether the last steps drop their order: True always, False never, "auto" only when n_steps < 10.

    "auto" is the rule of the official DPM-Solver code (docs/solvers_extra.md §5).
    """
    if lower_order_final == "auto":
        return n_steps < 10
    if not isinstance(lower_order_final, bool):
        raise ValueError(f"lower_order_final must be True, False or 'auto', got {lower_order_final!r}")
    return lower_order_final


def per_sample_noise(generators: Sequence[torch.Generator]) -> Noise:
    """A stochastic solver's `noise`: standard normal like x, row r drawn from generators[r] (CPU, float32).

    Each sample draws from its own generator, so its noise never depends on its batch or the device.
    """

    def noise(x: Tensor) -> Tensor:
        if len(generators) != x.shape[0]:
            raise ValueError(f"noise: {len(generators)} generators for a batch of {x.shape[0]}")
        rows = [torch.randn(x.shape[1:], generator=g) for g in generators]
        return torch.stack(rows).to(device=x.device, dtype=x.dtype)

    return noise


def seeded_noise(seeds: Tensor | Sequence[int]) -> Noise:
    """`per_sample_noise` with one fresh generator per sample, seeded with seeds[r]."""
    return per_sample_noise([torch.Generator().manual_seed(int(s)) for s in torch.as_tensor(seeds).tolist()])


def needs_noise(name: str, noise: Noise | None) -> Noise:
    """The noise source of a stochastic solver, or a clear error when it has none."""
    if noise is None:
        raise ValueError(
            f"{name} is stochastic: pass noise=, a per-sample source such as evodiff_pl.solvers.seeded_noise(seeds) "
            "(evodiff_pl.sampling.generate.generate does this from each sample's seed)"
        )
    return noise


def levels(x: Tensor, sigmas: Tensor) -> list[float]:
    """Validate the state and the grid; return the levels as Python floats (float64)."""
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError("x must be a floating-point tensor of shape (B, D) or (B, C, *spatial)")
    s = torch.as_tensor(sigmas).detach()
    if s.ndim != 1 or s.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor with at least 2 levels, got shape {tuple(s.shape)}")
    s = s.to("cpu", torch.float64)
    if not torch.isfinite(s).all() or (s <= 0).any():
        raise ValueError("sigmas must be finite and > 0 (no trailing zero: use denoise_to_zero=True)")
    if (s[1:] >= s[:-1]).any():
        raise ValueError("sigmas must be strictly decreasing from sigma_max to sigma_min")
    return s.tolist()


def denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def phi(x: Tensor, d: Tensor, q: float) -> Tensor:
    """DDIM / Euler-in-sigma / DPM-Solver++(1) step with q = sigma_i / sigma_{i-1}."""
    # docs/method.md §2.1: Phi_i(x) = (sigma_i/sigma_{i-1}) x + (1 - sigma_i/sigma_{i-1}) D_{i-1}
    return q * x + (1.0 - q) * d


def finish(denoiser: Denoiser, x: Tensor, sigma_min: float, denoise_to_zero: bool) -> Tensor:
    return denoise(denoiser, x, sigma_min) if denoise_to_zero else x


def dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> per sample and per channel: (B, C, *spatial) -> (B, C, 1, ...); (B, D) -> (B, 1)."""
    dims = (1,) if a.ndim == 2 else tuple(range(2, a.ndim))
    return (a * b).sum(dim=dims, keepdim=True)


def clipped_ratio(num: Tensor, den: Tensor) -> Tensor:
    """clip(num / den, -2, 2), with 0/0 (den == 0 implies num == 0 here) giving 0."""
    return (num / torch.where(den == 0, torch.ones_like(den), den)).clamp(-2.0, 2.0)
