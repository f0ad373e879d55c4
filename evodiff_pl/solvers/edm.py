"""Euler (= DDIM), EDM's deterministic Heun sampler (Karras et al. 2022, Alg. 1) and its stochastic one (Alg. 2).

docs/method.md §2.2, docs/solvers_extra.md §3.
"""

from __future__ import annotations

import math

from torch import Tensor

from evodiff_pl.solvers.base import (
    Callback,
    Denoiser,
    Noise,
    counts_nfe,
    denoise,
    finish,
    levels,
    needs_noise,
    one_per_step,
    phi,
)


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
        x = _heun_step(denoiser, x, s[i - 1], s[i])
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)


def _heun_step(denoiser: Denoiser, x: Tensor, t_cur: float, t_next: float) -> Tensor:
    # EDM Alg. 1 l. 4: d_i = (x_i - D(x_i; t_i)) / t_i
    d = (x - denoise(denoiser, x, t_cur)) / t_cur
    # EDM Alg. 1 l. 5: x_{i+1} = x_i + (t_{i+1} - t_i) d_i
    x_pred = x + (t_next - t_cur) * d
    # EDM Alg. 1 l. 7-8: x_{i+1} = x_i + (t_{i+1} - t_i) (d_i + d'_i) / 2
    d_pred = (x_pred - denoise(denoiser, x_pred, t_next)) / t_next
    return x + (0.5 * (t_next - t_cur)) * (d + d_pred)


def _check_churn(S_churn: float, S_tmin: float, S_tmax: float, S_noise: float) -> None:
    if not (S_churn >= 0 and S_noise >= 0 and 0 <= S_tmin <= S_tmax):
        raise ValueError(
            f"edm_stochastic: need S_churn >= 0, S_noise >= 0 and 0 <= S_tmin <= S_tmax, "
            f"got S_churn={S_churn!r}, S_tmin={S_tmin!r}, S_tmax={S_tmax!r}, S_noise={S_noise!r}"
        )


def _edm_stochastic_nfe(
    n_steps: int, S_churn: float = 40.0, S_tmin: float = 0.05, S_tmax: float = 50.0, S_noise: float = 1.003, **_: object
) -> int:
    _check_churn(S_churn, S_tmin, S_tmax, S_noise)
    return 2 * n_steps


@counts_nfe(_edm_stochastic_nfe)
def edm_stochastic(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    S_churn: float = 40.0,
    S_tmin: float = 0.05,
    S_tmax: float = 50.0,
    S_noise: float = 1.003,
    noise: Noise | None = None,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """EDM Algorithm 2 (Karras et al. 2022): raise sigma by gamma with fresh noise, then one Heun step.

    NFE: 2 per step, 2N for a grid of N + 1 levels (every step corrected, as `heun`). EDM's code on
    the same levels makes 2(N + 1) - 1 calls: its last step is a plain Euler step to sigma = 0, i.e.
    `denoise_to_zero=True` here when no churn applies at sigma_N.
    S_churn: total churn; each step with S_tmin <= sigma_{i-1} <= S_tmax uses
        gamma = min(S_churn / (N + 1), sqrt(2) - 1), N + 1 the number of levels (EDM's num_steps).
        The defaults are EDM's released ImageNet-64 command (S_churn 40, S_tmin 0.05, S_tmax 50,
        S_noise 1.003, there with 256 steps); S_churn = 0 is `heun`.
    S_noise: scale of the added noise (slightly > 1 offsets the denoiser's loss of detail).
    noise: noise(x) -> standard normal like x, row j from sample j's own generator (`seeded_noise`);
        required when S_churn > 0. It is drawn only on churned steps.
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = levels(x, sigmas)
    n = len(s) - 1
    _check_churn(S_churn, S_tmin, S_tmax, S_noise)
    if S_churn > 0:
        noise = needs_noise("edm_stochastic", noise)
    for i in range(1, n + 1):
        t_cur = s[i - 1]
        # EDM Alg. 2 l. 5: gamma_i = min(S_churn / N, sqrt(2) - 1) if t_i in [S_tmin, S_tmax] else 0 (EDM's N: n + 1)
        gamma = min(S_churn / (n + 1), math.sqrt(2.0) - 1.0) if S_tmin <= t_cur <= S_tmax else 0.0
        if gamma > 0:
            # EDM Alg. 2 l. 6-7: t^_i = t_i + gamma t_i, x^_i = x_i + sqrt(t^_i^2 - t_i^2) S_noise eps
            t_cur = t_cur * (1.0 + gamma)
            x = x + (s[i - 1] * math.sqrt(gamma * (2.0 + gamma)) * S_noise) * noise(x)
        # EDM Alg. 2 l. 8-12: the Heun step from t^_i to t_{i+1}
        x = _heun_step(denoiser, x, t_cur, s[i])
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)
