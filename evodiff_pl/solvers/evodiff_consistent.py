"""UniPC-2's predictor-corrector step with EVODiff's per-sample weight as an option; docs/evodiff_consistent.md."""

from __future__ import annotations

import math

from torch import Tensor

from evodiff_pl.solvers.base import (
    Callback,
    Denoiser,
    clipped_ratio,
    counts_nfe,
    denoise,
    dot,
    finish,
    levels,
    one_per_step,
    phi,
)


def _min_variance_weight(delta_b: Tensor, delta_f: Tensor) -> Tensor:
    """eta in [0, 1] minimising ||eta delta_b + (1 - eta) delta_f||^2, per sample and channel (0 where delta_b == delta_f)."""
    # docs/evodiff_consistent.md eq. (5): eta* = <delta_f - delta_b, delta_f> / ||delta_f - delta_b||^2, clipped to [0, 1]
    diff = delta_f - delta_b
    return clipped_ratio(dot(diff, delta_f), dot(diff, diff)).clamp(0.0, 1.0)


@counts_nfe(one_per_step)
def evodiff_consistent(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    eta: float | None = 0.0,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """A predictor-corrector multistep step with a fixed or EVODiff's per-sample weight: second order on any grid.

    UniPC-2's template (Zhao et al. 2023): step i >= 2 predicts with the DPM-Solver++(2M) step, evaluates D
    there (the one NFE of the step, kept as the history) and corrects with eta * (D_{i-1} - D_{i-2}) / r +
    (1 - eta) * (D_i - D_{i-1}), the backward and the forward difference (docs/evodiff_consistent.md). The
    first step is DDIM. N NFE for a grid of N + 1 levels.

    eta: the weight of the backward difference. 0 (default: the forward difference only, UniC-1's corrector
        on the UniP-2 prediction; the best measured overall on the digits models and the mixture with an order
        >= 1.8 from N = 24, benchmarks/results/evodiff_consistent.md §6); None chooses it per sample and channel
        as the convex combination of least norm (EVODiff's variance-optimised weight); any number in [0, 1]
        fixes it (1: exactly dpmpp_2m; 1/6: UniC-2's weight for small uniform steps).
    lower_order_final: the last step is DDIM (order 1, as dpmpp_2m); False: the DPM-Solver++(2M) step.
        Neither evaluates D at sigma_N.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = levels(x, sigmas)
    n = len(s) - 1
    if eta is not None and not 0.0 <= eta <= 1.0:
        raise ValueError(f"evodiff_consistent: eta must be None or in [0, 1], got {eta!r}")
    d_pre, d_cur = None, denoise(denoiser, x, s[0])
    for i in range(1, n + 1):
        h = math.log(s[i - 1] / s[i])
        x_euler = phi(x, d_cur, s[i] / s[i - 1])
        d_new = None
        if d_pre is None or (i == n and lower_order_final):
            x = x_euler
        else:
            # DPM-Solver++ (Lu et al. 2022) Alg. 2: + 1/2 (1 - e^{-h}) (D_{i-1} - D_{i-2}) / r, r = h_{i-1} / h_i
            c = -0.5 * math.expm1(-h)
            delta_b = (d_cur - d_pre) / (math.log(s[i - 2] / s[i - 1]) / h)
            x = x_euler + c * delta_b
            if i < n:
                d_new = denoise(denoiser, x, s[i])
                delta_f = d_new - d_cur
                weight = _min_variance_weight(delta_b, delta_f) if eta is None else eta
                # docs/evodiff_consistent.md eq. (4): x_i = Phi_i(x_{i-1}) + c (eta delta_b + (1 - eta) delta_f)
                x = x_euler + c * (delta_f + weight * (delta_b - delta_f))
        if callback is not None:
            callback(i, s[i], x)
        if i < n:
            d_pre, d_cur = d_cur, denoise(denoiser, x, s[i]) if d_new is None else d_new
    return finish(denoiser, x, s[-1], denoise_to_zero)
