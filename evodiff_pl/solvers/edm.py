"""Euler (= DDIM) and EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1); docs/method.md §2.2."""

from __future__ import annotations

from torch import Tensor

from evodiff_pl.solvers.base import Callback, Denoiser, counts_nfe, denoise, finish, levels, one_per_step, phi


@counts_nfe(one_per_step)
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
    s = levels(x, sigmas)
    for i in range(1, len(s)):
        x = phi(x, denoise(denoiser, x, s[i - 1]), s[i] / s[i - 1])
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)


@counts_nfe(lambda n_steps, **_: 2 * n_steps)
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
    s = levels(x, sigmas)
    for i in range(1, len(s)):
        # EDM Alg. 1 l. 4: d_i = (x_i - D(x_i; t_i)) / t_i
        d = (x - denoise(denoiser, x, s[i - 1])) / s[i - 1]
        # EDM Alg. 1 l. 5: x_{i+1} = x_i + (t_{i+1} - t_i) d_i
        x_pred = x + (s[i] - s[i - 1]) * d
        # EDM Alg. 1 l. 7-8: x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2
        d_pred = (x_pred - denoise(denoiser, x_pred, s[i])) / s[i]
        x = x + (0.5 * (s[i] - s[i - 1])) * (d + d_pred)
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)
