"""DPM-Solver++ multistep, data prediction (Lu et al. 2022), orders 2 and 3, and its 2M SDE; docs/method.md §2.3."""

from __future__ import annotations

import math

from torch import Tensor

from evodiff_pl.solvers.base import (
    Callback,
    Denoiser,
    LowerOrderFinal,
    Noise,
    counts_nfe,
    denoise,
    lowers_last_steps,
    finish,
    levels,
    needs_noise,
    phi,
)


def _dpmpp_nfe(n_steps: int, lower_order_final: LowerOrderFinal = True, **_: object) -> int:
    lowers_last_steps(lower_order_final, n_steps)
    return n_steps


def _dpmpp_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    max_order: int,
    lower_order_final: LowerOrderFinal,
    denoise_to_zero: bool,
    callback: Callback | None,
) -> Tensor:
    """DPM-Solver++ multistep of order min(max_order, i) at step i, lowered at the end per `lowers_last_steps`."""
    s = levels(x, sigmas)
    n = len(s) - 1
    lower = lowers_last_steps(lower_order_final, n)
    h = [math.nan] + [math.log(s[i - 1] / s[i]) for i in range(1, n + 1)]
    hist = [denoise(denoiser, x, s[0])]
    for i in range(1, n + 1):
        order = min(max_order, i, n + 1 - i if lower else max_order)
        x_new = phi(x, hist[-1], s[i] / s[i - 1])
        if order >= 2:
            r0 = h[i - 1] / h[i]
            d1_0 = (hist[-1] - hist[-2]) / r0
        if order == 2:
            # DPM-Solver++ (Lu et al. 2022) Alg. 2: + 1/2 (1 - e^{-h}) (D_{i-1} - D_{i-2}) / r
            x_new = x_new + (-0.5 * math.expm1(-h[i])) * d1_0
        elif order == 3:
            r1 = h[i - 2] / h[i]
            d1_1 = (hist[-2] - hist[-3]) / r1
            # DPM-Solver++ official multistep_dpm_solver_third_update: D2 = (D1_0 - D1_1)/(r0 + r1), D1 = D1_0 + r0 D2
            d2 = (d1_0 - d1_1) / (r0 + r1)
            d1 = d1_0 + r0 * d2
            # DPM-Solver++ official third update: + phi_2 D1 - phi_3 D2, phi_2 = expm1(-h)/h + 1, phi_3 = phi_2/h - 1/2
            phi_2 = math.expm1(-h[i]) / h[i] + 1.0
            phi_3 = phi_2 / h[i] - 0.5
            x_new = x_new + phi_2 * d1 - phi_3 * d2
        x = x_new
        if callback is not None:
            callback(i, s[i], x)
        if i < n:
            hist = hist[-(max_order - 1):] + [denoise(denoiser, x, s[i])]
    return finish(denoiser, x, s[-1], denoise_to_zero)


@counts_nfe(_dpmpp_nfe)
def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    lower_order_final: LowerOrderFinal = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Alg. 2): 1 NFE per step, N in total.

    The first step is order 1. lower_order_final: True (default, chosen on the mixture:
    docs/solvers_extra.md §5) makes the last step order 1 for every N; "auto" only for N < 10 (the
    official DPM-Solver rule); False never.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 2, lower_order_final, denoise_to_zero, callback)


@counts_nfe(_dpmpp_nfe)
def dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    lower_order_final: LowerOrderFinal = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ order-3 multistep, data prediction (Lu et al. 2022): 1 NFE per step, N in total.

    The first two steps are orders 1 and 2. lower_order_final: True (default, chosen on the mixture
    and the digits: docs/solvers_extra.md §5) makes the last step order 1 and the second-to-last at
    most order 2 for every N; "auto" only for N < 10, the official DPM-Solver rule (better on the
    mixture from ~15 steps); False never.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 3, lower_order_final, denoise_to_zero, callback)


def _check_2m_sde(eta: float, solver_type: str) -> None:
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"dpmpp_2m_sde: solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    if not eta >= 0:
        raise ValueError(f"dpmpp_2m_sde: eta must be >= 0, got {eta!r}")


def _dpmpp_2m_sde_nfe(n_steps: int, eta: float = 1.0, solver_type: str = "midpoint", **_: object) -> int:
    _check_2m_sde(eta, solver_type)
    return n_steps


@counts_nfe(_dpmpp_2m_sde_nfe)
def dpmpp_2m_sde(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float = 1.0,
    s_noise: float = 1.0,
    solver_type: str = "midpoint",
    noise: Noise | None = None,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M) SDE, data prediction (Lu et al. 2022; k-diffusion's form): 1 NFE per step, N in total.

    Every step draws fresh noise; the first step is order 1, the last is not lowered.
    eta: 0 is the ODE (midpoint: = dpmpp_2m with lower_order_final=False), 1 the reverse SDE.
    s_noise: scale of the injected noise.
    solver_type: "midpoint" or "heun", the two second-order corrections (docs/solvers_extra.md §4).
    noise: noise(x) -> standard normal like x, row j from sample j's own generator (`seeded_noise`);
        required when eta > 0.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = levels(x, sigmas)
    _check_2m_sde(eta, solver_type)
    if eta > 0:
        noise = needs_noise("dpmpp_2m_sde", noise)
    d_old, h_old = None, math.nan
    for i in range(1, len(s)):
        d = denoise(denoiser, x, s[i - 1])
        h = math.log(s[i - 1] / s[i])
        # docs/solvers_extra.md (4.1): x_i = (sigma_i/sigma_{i-1}) e^{-eta h} x + (1 - e^{-(1+eta) h}) D_{i-1}
        one_minus = -math.expm1(-h - eta * h)
        x_new = (s[i] / s[i - 1] * math.exp(-eta * h)) * x + one_minus * d
        if d_old is not None:
            r = h_old / h
            if solver_type == "midpoint":
                # docs/solvers_extra.md (4.2): + (1 - e^{-(1+eta) h}) / 2 (D_{i-1} - D_{i-2}) / r
                x_new = x_new + (0.5 * one_minus / r) * (d - d_old)
            else:
                # docs/solvers_extra.md (4.3): + ((1 - e^{-(1+eta) h}) / (-(1+eta) h) + 1) (D_{i-1} - D_{i-2}) / r
                x_new = x_new + ((one_minus / (-h - eta * h) + 1.0) / r) * (d - d_old)
        if eta > 0:
            # docs/solvers_extra.md (4.1): + sigma_i sqrt(1 - e^{-2 eta h}) s_noise z
            x_new = x_new + (s[i] * math.sqrt(-math.expm1(-2.0 * eta * h)) * s_noise) * noise(x_new)
        x, d_old, h_old = x_new, d, h
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)
