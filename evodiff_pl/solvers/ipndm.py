"""Improved PNDM (iPNDM, Zhang & Chen 2023, the DEIS paper): Adams-Bashforth on eps; docs/solvers_extra.md §2."""

from __future__ import annotations

from torch import Tensor

from evodiff_pl.solvers.base import Callback, Denoiser, counts_nfe, denoise, finish, levels

# Adams-Bashforth weights of orders 1-4 on equal steps, newest derivative first (docs/solvers_extra.md (2.2))
_AB = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}


def _check_ipndm(order: int) -> None:
    if order not in _AB:
        raise ValueError(f"ipndm: order={order!r} is not available; valid: 1, 2, 3, 4")


def _ipndm_nfe(n_steps: int, order: int = 4, **_: object) -> int:
    _check_ipndm(order)
    return n_steps


@counts_nfe(_ipndm_nfe)
def ipndm(
    denoiser: Denoiser,
    x: Tensor,
    sigmas: Tensor,
    *,
    order: int = 4,
    denoise_to_zero: bool = False,
    callback: Callback | None = None,
) -> Tensor:
    """iPNDM: explicit Adams-Bashforth in sigma on eps = (x - D) / sigma; 1 NFE per step, N in total.

    Step i uses order min(order, i), so any grid of >= 2 levels works for every order (the warm start).
    The weights are those of equal steps whatever the grid, as in the authors' code.
    order: 1-4 (1 is euler).
    denoise_to_zero: return D(x_N, sigma_N) instead of x_N (+1 NFE).
    callback: called as callback(i, sigma_i, x_i) after every step.
    """
    s = levels(x, sigmas)
    _check_ipndm(order)
    eps: list[Tensor] = []
    for i in range(1, len(s)):
        # docs/solvers_extra.md (2.1): eps_{i-1} = (x_{i-1} - D(x_{i-1}, sigma_{i-1})) / sigma_{i-1}
        eps = [(x - denoise(denoiser, x, s[i - 1])) / s[i - 1]] + eps[: order - 1]
        # docs/solvers_extra.md (2.2): x_i = x_{i-1} + (sigma_i - sigma_{i-1}) sum_k a_k eps_{i-1-k}
        slope = sum(a * e for a, e in zip(_AB[len(eps)], eps))
        x = x + (s[i] - s[i - 1]) * slope
        if callback is not None:
            callback(i, s[i], x)
    return finish(denoiser, x, s[-1], denoise_to_zero)
