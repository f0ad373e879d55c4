"""UniPC (Zhao et al. 2023): multistep UniP predictor and UniC corrector, data prediction; docs/solvers_extra.md §1."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evodiff_pl.solvers.base import (
    Callback,
    Denoiser,
    LowerOrderFinal,
    counts_nfe,
    denoise,
    lowers_last_steps,
    finish,
    levels,
    phi,
)

VARIANTS = ("bh1", "bh2")


def _check_unipc(n_steps: int, order: int, variant: str, lower_order_final: LowerOrderFinal) -> None:
    if order not in (1, 2, 3):
        raise ValueError(f"unipc: order={order!r} is not available; valid: 1, 2, 3")
    if variant not in VARIANTS:
        raise ValueError(f"unipc: variant must be one of {', '.join(VARIANTS)}, got {variant!r}")
    if n_steps < order:
        raise ValueError(f"unipc order {order} needs at least {order} steps ({order + 1} sigma levels), got {n_steps}")
    lowers_last_steps(lower_order_final, n_steps)


def _unipc_nfe(
    n_steps: int, order: int = 2, variant: str = "bh2", lower_order_final: LowerOrderFinal = True, **_: object
) -> int:
    _check_unipc(n_steps, order, variant, lower_order_final)
    return n_steps


def _coefficients(h: float, rks: list[float], variant: str) -> tuple[float, list[float], list[float]]:
    """B(h) and the predictor and corrector weights rho_p (len(rks)), rho_c (len(rks) + 1) of one step.

    rks: r_k = (lambda_{i-1-k} - lambda_{i-1}) / h of the k = 1..p-1 older points (negative here).
    """
    z = -h
    # docs/solvers_extra.md (1.3): B_1 = z, B_2 = e^z - 1 with z = -h (data prediction)
    b_h = z if variant == "bh1" else math.expm1(z)
    order = len(rks) + 1
    r = torch.tensor(rks + [1.0], dtype=torch.float64)
    # docs/solvers_extra.md (1.4): g_k = k! psi_k / B, psi_1 = (e^z - 1)/z - 1, psi_{k+1} = psi_k / z - 1/(k+1)!
    psi, factorial, g = math.expm1(z) / z - 1.0, 1, []
    for k in range(1, order + 1):
        g.append(psi * factorial / b_h)
        factorial *= k + 1
        psi = psi / z - 1.0 / factorial
    big_r = torch.stack([r ** (k - 1) for k in range(1, order + 1)])
    rhs = torch.tensor(g, dtype=torch.float64)
    # docs/solvers_extra.md (1.5): UniP-p solves R_{p-1} rho = g_{1..p-1}; p = 2 uses rho = 1/2 (authors' code)
    if order == 1:
        rho_p = []
    elif order == 2:
        rho_p = [0.5]
    else:
        rho_p = torch.linalg.solve(big_r[:-1, :-1], rhs[:-1]).tolist()
    # docs/solvers_extra.md (1.6): UniC-p solves R_p rho = g_{1..p}; p = 1 uses rho = 1/2 (authors' code)
    rho_c = [0.5] if order == 1 else torch.linalg.solve(big_r, rhs).tolist()
    return b_h, rho_p, rho_c


@counts_nfe(_unipc_nfe)
def unipc(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    variant: str = "bh2",
    corrector: bool = True,
    lower_order_final: LowerOrderFinal = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """UniPC multistep (Zhao et al. 2023), data prediction, as the authors' code runs it: 1 NFE per step, N in total.

    Step i predicts with UniP of order p_i = min(order, i) and, except at the last step, corrects with
    UniC (order p_i + 1) from D at the predicted state; that D is kept as the model value at sigma_i
    (no extra call), and no D is evaluated after the final step.
    order: 1, 2 or 3; needs N >= order steps. 2 (default) was best on the mixture up to ~12 steps,
        3 from ~15 (docs/solvers_extra.md §5).
    variant: "bh2" (default, B(h) = e^h - 1; best on the mixture at every N) or "bh1" (B(h) = h,
        the authors' suggestion for unconditional sampling with few steps).
    corrector: False runs UniP alone.
    lower_order_final: True (default, chosen on the mixture: docs/solvers_extra.md §5) lowers the
        last steps to p_i = min(order, N + 1 - i) for every N, as the authors' code does; "auto" only
        for N < 10 (the official DPM-Solver rule); False never.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = levels(x, sigmas)
    n = len(s) - 1
    _check_unipc(n, order, variant, lower_order_final)
    lower = lowers_last_steps(lower_order_final, n)
    lam = [-math.log(v) for v in s]
    hist = [denoise(denoiser, x, s[0])]
    for i in range(1, n + 1):
        p = min(order, i, n + 1 - i if lower else order)
        h = lam[i] - lam[i - 1]
        rks = [(lam[i - 1 - k] - lam[i - 1]) / h for k in range(1, p)]
        # docs/solvers_extra.md (1.2): D1_k = (D_{i-1-k} - D_{i-1}) / r_k
        d1 = [(hist[-1 - k] - hist[-1]) / rk for k, rk in zip(range(1, p), rks)]
        b_h, rho_p, rho_c = _coefficients(h, rks, variant)
        # docs/solvers_extra.md (1.1): the DDIM step Phi_i(x) = (sigma_i/sigma_{i-1}) x + (1 - e^{-h}) D_{i-1}
        x_base = phi(x, hist[-1], s[i] / s[i - 1])
        # docs/solvers_extra.md (1.5), UniP: x_i = Phi_i(x) - B sum_k rho_k D1_k
        x_new = x_base - b_h * sum(c * d for c, d in zip(rho_p, d1)) if d1 else x_base
        d_new = None
        if corrector and i < n:
            d_new = denoise(denoiser, x_new, s[i])
            # docs/solvers_extra.md (1.6), UniC: x_i^c = Phi_i(x) - B (sum_k rho_k D1_k + rho_p (D(x_i) - D_{i-1}))
            corr = sum((c * d for c, d in zip(rho_c[:-1], d1)), rho_c[-1] * (d_new - hist[-1]))
            x_new = x_base - b_h * corr
        x = x_new
        if callback is not None:
            callback(i, s[i], x)
        if i < n:
            hist = (hist + [denoise(denoiser, x, s[i]) if d_new is None else d_new])[-order:]
    return finish(denoiser, x, s[-1], denoise_to_zero)
