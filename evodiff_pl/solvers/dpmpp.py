"""DPM-Solver++ multistep, data prediction (Lu et al. 2022), orders 2 and 3; docs/method.md §2.3."""

from __future__ import annotations

import math

from torch import Tensor

from evodiff_pl.solvers.base import Callback, Denoiser, counts_nfe, denoise, finish, levels, one_per_step, phi


def _dpmpp_multistep(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    max_order: int,
    lower_order_final: bool,
    denoise_to_zero: bool,
    callback: Callback | None,
) -> Tensor:
    """DPM-Solver++ multistep of order min(max_order, i) at step i, order 1 at the end if lower_order_final."""
    s = levels(x, sigmas)
    n = len(s) - 1
    h = [math.nan] + [math.log(s[i - 1] / s[i]) for i in range(1, n + 1)]
    hist = [denoise(denoiser, x, s[0])]
    for i in range(1, n + 1):
        order = min(max_order, i, n + 1 - i if lower_order_final else max_order)
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


@counts_nfe(one_per_step)
def dpmpp_2m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++(2M), data prediction (Lu et al. 2022, Alg. 2): 1 NFE per step, N in total.

    The first step is order 1. lower_order_final: the last step is order 1 (for every N).
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 2, lower_order_final, denoise_to_zero, callback)


@counts_nfe(one_per_step)
def dpmpp_3m(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """DPM-Solver++ order-3 multistep, data prediction (Lu et al. 2022): 1 NFE per step, N in total.

    The first two steps are orders 1 and 2. lower_order_final: the last step is order 1 and the
    second-to-last at most order 2 (for every N).
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    return _dpmpp_multistep(denoiser, x, sigmas, 3, lower_order_final, denoise_to_zero, callback)
