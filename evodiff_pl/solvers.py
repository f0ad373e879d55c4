"""Deterministic probability-flow ODE solvers over a given sigma grid (SPEC §2).

Every solver is a pure function ``(denoiser, x, sigmas, *, options) -> Tensor`` in the VE/EDM
parameterisation x_sigma = x_0 + sigma * eps, where ``denoiser(x, sigma)`` is the data prediction
D(x, sigma) and ``sigma`` has shape (B,). ``sigmas`` runs from sigma_max down to sigma_min > 0 (no
trailing zero); the solver steps through each consecutive pair and returns the state at
``sigmas[-1]``. Step coefficients are computed in float64 from the grid and applied in x's dtype.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable

import torch
from torch import Tensor

Denoiser = Callable[[Tensor, Tensor], Tensor]
Callback = Callable[[int, float, Tensor], None]


def _levels(x: Tensor, sigmas: Tensor) -> list[float]:
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


def _denoise(denoiser: Denoiser, x: Tensor, sigma: float) -> Tensor:
    return denoiser(x, x.new_full((x.shape[0],), sigma))


def _phi(x: Tensor, d: Tensor, q: float) -> Tensor:
    """DDIM / Euler-in-sigma / DPM-Solver++(1) step with q = sigma_i / sigma_{i-1}."""
    # SPEC §2: Phi_i(x) = (sigma_i/sigma_{i-1}) x + (1 - sigma_i/sigma_{i-1}) D_{i-1}
    return q * x + (1.0 - q) * d


def _finish(denoiser: Denoiser, x: Tensor, sigma_min: float, denoise_to_zero: bool) -> Tensor:
    return _denoise(denoiser, x, sigma_min) if denoise_to_zero else x


def euler(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """Euler in sigma (= DDIM): 1 NFE per step, N for a grid of N + 1 levels.

    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = _levels(x, sigmas)
    for i in range(1, len(s)):
        x = _phi(x, _denoise(denoiser, x, s[i - 1]), s[i] / s[i - 1])
        if callback is not None:
            callback(i, s[i], x)
    return _finish(denoiser, x, s[-1], denoise_to_zero)


def heun(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """EDM Algorithm 1 (Karras et al. 2022), deterministic: Euler predictor, trapezoid corrector.

    NFE: 2 per step, i.e. 2N for a grid of N + 1 levels. Every step is corrected because the grid
    ends at sigma_min > 0; EDM's count 2N - 1 includes a final plain Euler step to sigma = 0.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = _levels(x, sigmas)
    for i in range(1, len(s)):
        # EDM Alg. 1 l. 4: d_i = (x_i - D(x_i; t_i)) / t_i
        d = (x - _denoise(denoiser, x, s[i - 1])) / s[i - 1]
        # EDM Alg. 1 l. 5: x_{i+1} = x_i + (t_{i+1} - t_i) d_i
        x_pred = x + (s[i] - s[i - 1]) * d
        # EDM Alg. 1 l. 7-8: x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2
        d_pred = (x_pred - _denoise(denoiser, x_pred, s[i])) / s[i]
        x = x + (0.5 * (s[i] - s[i - 1])) * (d + d_pred)
        if callback is not None:
            callback(i, s[i], x)
    return _finish(denoiser, x, s[-1], denoise_to_zero)


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
    s = _levels(x, sigmas)
    n = len(s) - 1
    h = [math.nan] + [math.log(s[i - 1] / s[i]) for i in range(1, n + 1)]
    hist = [_denoise(denoiser, x, s[0])]
    for i in range(1, n + 1):
        order = min(max_order, i, n + 1 - i if lower_order_final else max_order)
        x_new = _phi(x, hist[-1], s[i] / s[i - 1])
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
            hist = hist[-(max_order - 1):] + [_denoise(denoiser, x, s[i])]
    return _finish(denoiser, x, s[-1], denoise_to_zero)


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


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """<a, b> per sample and per channel: (B, C, *spatial) -> (B, C, 1, ...); (B, D) -> (B, 1)."""
    dims = (1,) if a.ndim == 2 else tuple(range(2, a.ndim))
    return (a * b).sum(dim=dims, keepdim=True)


def _clipped_ratio(num: Tensor, den: Tensor) -> Tensor:
    """clip(num / den, -2, 2), with 0/0 (den == 0 implies num == 0 here) giving 0."""
    return (num / torch.where(den == 0, torch.ones_like(den), den)).clamp(-2.0, 2.0)


def _proj(a: Tensor, b: Tensor) -> Tensor:
    # SPEC §2: proj(a, b) = clip(<a, b> / <b, b>, -2, 2)
    return _clipped_ratio(_dot(a, b), _dot(b, b))


def _check_evodiff(n_steps: int, order: int) -> None:
    if order != 2:
        raise ValueError(f"evodiff: order={order!r} is not available; the only valid order is 2")
    if n_steps < 2:
        raise ValueError(f"evodiff needs at least 2 steps (3 sigma levels), got {n_steps}")


def evodiff(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 2,
    lower_order_final: bool = True,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """EVODiff (Li, Chen, Zeng 2025), the released order-2 multistep sampler, exactly as SPEC §2.

    Inner products are per sample and per channel over the spatial dims ((B, D): one channel).
    order: only 2 exists in the released method.
    lower_order_final: True (default, the released setting) ends with the special step with r_f
        (0 NFE): N NFE for a grid of N + 1 levels. False runs the regular variance-optimised step at
        i = N as well, as the official code does; it evaluates the probe at sigma_N: N + 1 NFE.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE); the official README runs N - 1
        steps plus this call at the same total NFE.
    callback: called as callback(i, sigma_i, x_i) after every step.
    Needs N >= 2 steps. The zeta rule switches at N > 20.
    """
    s = _levels(x, sigmas)
    n = len(s) - 1
    _check_evodiff(n, order)
    s_max, s_min = s[0], s[-1]
    q = [math.nan] + [s[i] / s[i - 1] for i in range(1, n + 1)]
    h = [math.nan] + [math.log(s[i - 1] / s[i]) for i in range(1, n + 1)]

    # SPEC §2.1 warm-up: x_1 = Phi_1(x_0), D_1 = D(x_1, sigma_1)
    d_pre = _denoise(denoiser, x, s[0])
    x = _phi(x, d_pre, q[1])
    d_cur = _denoise(denoiser, x, s[1])
    rho_1 = _proj(d_cur, d_pre)
    if callback is not None:
        callback(1, s[1], x)

    for i in range(2, n if lower_order_final else n + 1):
        r = h[i - 1] / h[i]
        half_step = 0.5 * (1.0 - q[i])
        big_h = 1.0 / s[i] - 1.0 / s[i - 1]
        # SPEC §2: w = (1 - tau^2)/2, tau = (sigma_i + sigma_min)/(sigma_max + sigma_min)
        w = 0.5 * (1.0 - ((s[i] + s_min) / (s_max + s_min)) ** 2)
        # SPEC §2: b = sqrt((sigma_i/sigma_{i-1}) / (sigma_{i-1}/sigma_{i-2}))
        b = math.sqrt(q[i] / q[i - 1])
        # SPEC §2: beta_1 = (1 - w) b + w proj(D_{i-1}, D_{i-2}), Delta_1 = D_{i-1} - beta_1 D_{i-2}
        beta_1 = (1.0 - w) * b + w * rho_1
        delta_1 = d_cur - beta_1 * d_pre
        # SPEC §2: r~ = clip(sig(|beta_1|/4) r, r/4, 3r/2)
        r_tilde = (torch.sigmoid(0.25 * beta_1.abs()) * r).clamp(0.25 * r, 1.5 * r)
        x_euler = _phi(x, d_cur, q[i])
        # SPEC §2: probe x~_i = Phi_i(x_{i-1}) + (1 - e^{-h})/2 Delta_1 / r~
        d_new = _denoise(denoiser, x_euler + half_step * delta_1 / r_tilde, s[i])
        # SPEC §2: beta_2 = (1 - w) b + w proj(D_i, D_{i-1}), Delta_2 = D_i - beta_2 D_{i-1}
        rho_2 = _proj(d_new, d_cur)
        delta_2 = d_new - ((1.0 - w) * b + w * rho_2) * d_cur
        # SPEC §2: B_pre = Delta_1 / (r H), B_next = r Delta_2 / H
        b_pre = delta_1 / (r * big_h)
        b_next = (r / big_h) * delta_2
        # SPEC §2: eta* = clip(<B_next + B_pre, B_next - B_pre> / ||B_next - B_pre||^2, -2, 2) / 2
        diff = b_next - b_pre
        eta = 0.5 * torch.sigmoid((0.5 * _clipped_ratio(_dot(b_next + b_pre, diff), _dot(diff, diff))).abs())
        # SPEC §2: B_theta = -(eta/r) Delta_1 + (1 - eta) r Delta_2
        b_theta = -(eta / r) * delta_1 + ((1.0 - eta) * r) * delta_2
        # SPEC §2: zeta* = proj((1 - e^{-h})/2 (Delta_1 - B_theta)/r~, Delta_1) / (1 - e^{-h})
        zeta_shift = (_proj(half_step * (delta_1 - b_theta) / r_tilde, delta_1) / (1.0 - q[i])).abs() - 0.5
        if n <= 20:
            # SPEC §2 (N <= 20): zeta = sig(|zeta*| - 1/2)
            zeta = torch.sigmoid(zeta_shift)
        else:
            # SPEC §2 (N > 20): zeta = sig(-(|zeta*| - 1/2) c), c = sig(proj(D_{i-1}, (D_{i-1} - D_{i-2})/H) (2 - q^2))
            c = torch.sigmoid(_proj(d_cur, (d_cur - d_pre) / big_h) * (2.0 - q[i] ** 2))
            zeta = torch.sigmoid(-zeta_shift * c)
        # SPEC §2: x_i = Phi_i(x_{i-1}) + (1 - e^{-h})/2 B_theta / zeta; D_i stays the probe's
        x = x_euler + half_step * b_theta / zeta
        d_pre, d_cur, rho_1 = d_cur, d_new, rho_2
        if callback is not None:
            callback(i, s[i], x)

    if lower_order_final:
        q_f = q[n]
        # SPEC §2 final step: r_f = 1 - sqrt(q)/2 if q < 1/2 else 1 - sqrt(q - 1/2)/2
        r_f = 1.0 - 0.5 * math.sqrt(q_f if q_f < 0.5 else q_f - 0.5)
        # SPEC §2 final step: x_N = (1 - sqrt(sigma_N sigma_{N-1})) Phi_N(x) + (1 - q)/2 (D_{N-1} - r_f D_{N-2})
        x = (1.0 - math.sqrt(s[n] * s[n - 1])) * _phi(x, d_cur, q_f) + (0.5 * (1.0 - q_f)) * (d_cur - r_f * d_pre)
        if callback is not None:
            callback(n, s[n], x)
    return _finish(denoiser, x, s_min, denoise_to_zero)


SOLVERS: dict[str, Callable[..., Tensor]] = {
    "euler": euler,
    "heun": heun,
    "dpmpp_2m": dpmpp_2m,
    "dpmpp_3m": dpmpp_3m,
    "evodiff": evodiff,
}


def _evodiff_nfe(n_steps: int, order: int = 2, lower_order_final: bool = True, **_: object) -> int:
    _check_evodiff(n_steps, order)
    return n_steps + (not lower_order_final)


_NFE: dict[str, Callable[..., int]] = {
    "euler": lambda n_steps, **_: n_steps,
    "heun": lambda n_steps, **_: 2 * n_steps,
    "dpmpp_2m": lambda n_steps, **_: n_steps,
    "dpmpp_3m": lambda n_steps, **_: n_steps,
    "evodiff": _evodiff_nfe,
}


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
    return _NFE[name](n_steps, **options) + bool(options.get("denoise_to_zero", False))
