"""EVODiff (Li, Chen, Zeng 2025), the released order-2 variance-optimised sampler; docs/method.md §2.4."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evodiff_pl.solvers.base import Callback, Denoiser, clipped_ratio, counts_nfe, denoise, dot, finish, levels, phi


def _proj(a: Tensor, b: Tensor) -> Tensor:
    # docs/method.md §2.4: proj(a, b) = clip(<a, b> / <b, b>, -2, 2)
    return clipped_ratio(dot(a, b), dot(b, b))


def _check_evodiff(n_steps: int, order: int) -> None:
    if order != 2:
        raise ValueError(f"evodiff: order={order!r} is not available; the only valid order is 2")
    if n_steps < 2:
        raise ValueError(f"evodiff needs at least 2 steps (3 sigma levels), got {n_steps}")


def _evodiff_nfe(n_steps: int, order: int = 2, lower_order_final: bool = True, **_: object) -> int:
    _check_evodiff(n_steps, order)
    return n_steps + (not lower_order_final)


@counts_nfe(_evodiff_nfe)
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
    """EVODiff (Li, Chen, Zeng 2025), the released order-2 multistep sampler, exactly as docs/method.md §2.4 describes.

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
    s = levels(x, sigmas)
    n = len(s) - 1
    _check_evodiff(n, order)
    s_max, s_min = s[0], s[-1]
    q = [math.nan] + [s[i] / s[i - 1] for i in range(1, n + 1)]
    h = [math.nan] + [math.log(s[i - 1] / s[i]) for i in range(1, n + 1)]

    # docs/method.md §2.4 warm-up: x_1 = Phi_1(x_0), D_1 = D(x_1, sigma_1)
    d_pre = denoise(denoiser, x, s[0])
    x = phi(x, d_pre, q[1])
    d_cur = denoise(denoiser, x, s[1])
    rho_1 = _proj(d_cur, d_pre)
    if callback is not None:
        callback(1, s[1], x)

    for i in range(2, n if lower_order_final else n + 1):
        r = h[i - 1] / h[i]
        half_step = 0.5 * (1.0 - q[i])
        big_h = 1.0 / s[i] - 1.0 / s[i - 1]
        # docs/method.md §2.4: w = (1 - tau^2)/2, tau = (sigma_i + sigma_min)/(sigma_max + sigma_min)
        w = 0.5 * (1.0 - ((s[i] + s_min) / (s_max + s_min)) ** 2)
        # docs/method.md §2.4: b = sqrt((sigma_i/sigma_{i-1}) / (sigma_{i-1}/sigma_{i-2}))
        b = math.sqrt(q[i] / q[i - 1])
        # docs/method.md §2.4: beta_1 = (1 - w) b + w proj(D_{i-1}, D_{i-2}), Delta_1 = D_{i-1} - beta_1 D_{i-2}
        beta_1 = (1.0 - w) * b + w * rho_1
        delta_1 = d_cur - beta_1 * d_pre
        # docs/method.md §2.4: r~ = clip(sig(|beta_1|/4) r, r/4, 3r/2)
        r_tilde = (torch.sigmoid(0.25 * beta_1.abs()) * r).clamp(0.25 * r, 1.5 * r)
        x_euler = phi(x, d_cur, q[i])
        # docs/method.md §2.4: probe x~_i = Phi_i(x_{i-1}) + (1 - e^{-h})/2 Delta_1 / r~
        d_new = denoise(denoiser, x_euler + half_step * delta_1 / r_tilde, s[i])
        # docs/method.md §2.4: beta_2 = (1 - w) b + w proj(D_i, D_{i-1}), Delta_2 = D_i - beta_2 D_{i-1}
        rho_2 = _proj(d_new, d_cur)
        delta_2 = d_new - ((1.0 - w) * b + w * rho_2) * d_cur
        # docs/method.md §2.4: B_pre = Delta_1 / (r H), B_next = r Delta_2 / H
        b_pre = delta_1 / (r * big_h)
        b_next = (r / big_h) * delta_2
        # docs/method.md §2.4: eta* = clip(<B_next + B_pre, B_next - B_pre> / ||B_next - B_pre||^2, -2, 2) / 2
        diff = b_next - b_pre
        eta = 0.5 * torch.sigmoid((0.5 * clipped_ratio(dot(b_next + b_pre, diff), dot(diff, diff))).abs())
        # docs/method.md §2.4: B_theta = -(eta/r) Delta_1 + (1 - eta) r Delta_2
        b_theta = -(eta / r) * delta_1 + ((1.0 - eta) * r) * delta_2
        # docs/method.md §2.4: zeta* = proj((1 - e^{-h})/2 (Delta_1 - B_theta)/r~, Delta_1) / (1 - e^{-h})
        zeta_shift = (_proj(half_step * (delta_1 - b_theta) / r_tilde, delta_1) / (1.0 - q[i])).abs() - 0.5
        if n <= 20:
            # docs/method.md §2.4 (N <= 20): zeta = sig(|zeta*| - 1/2)
            zeta = torch.sigmoid(zeta_shift)
        else:
            # docs/method.md §2.4 (N > 20): zeta = sig(-(|zeta*| - 1/2) c), c = sig(proj(D_{i-1}, (D_{i-1} - D_{i-2})/H) (2 - q^2))
            c = torch.sigmoid(_proj(d_cur, (d_cur - d_pre) / big_h) * (2.0 - q[i] ** 2))
            zeta = torch.sigmoid(-zeta_shift * c)
        # docs/method.md §2.4: x_i = Phi_i(x_{i-1}) + (1 - e^{-h})/2 B_theta / zeta; D_i stays the probe's
        x = x_euler + half_step * b_theta / zeta
        d_pre, d_cur, rho_1 = d_cur, d_new, rho_2
        if callback is not None:
            callback(i, s[i], x)

    if lower_order_final:
        q_f = q[n]
        # docs/method.md §2.4 final step: r_f = 1 - sqrt(q)/2 if q < 1/2 else 1 - sqrt(q - 1/2)/2
        r_f = 1.0 - 0.5 * math.sqrt(q_f if q_f < 0.5 else q_f - 0.5)
        # docs/method.md §2.4 final step: x_N = (1 - sqrt(sigma_N sigma_{N-1})) Phi_N(x) + (1 - q)/2 (D_{N-1} - r_f D_{N-2})
        x = (1.0 - math.sqrt(s[n] * s[n - 1])) * phi(x, d_cur, q_f) + (0.5 * (1.0 - q_f)) * (d_cur - r_f * d_pre)
        if callback is not None:
            callback(n, s[n], x)
    return finish(denoiser, x, s_min, denoise_to_zero)
