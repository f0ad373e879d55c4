"""EDM2's learned-uncertainty training loss (Karras et al. 2024, eqs. (14)-(16), (21)) and the loss registry.

EDM's loss (`evodiff_pl.precond.EDMLoss`) and this one share the σ distribution ln σ ~ N(P_mean, P_std²), λ(σ)
and `LossOutput`, so the per-σ tracker reads the same `mse` and `weight` from either.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor

from evodiff_pl.precond import EDMLoss, LossOutput, _compute_dtype


class EDM2Loss(EDMLoss):
    """EDM2 loss: per element (λ(σ)/e^{u(σ)})·(D − x0)² + u(σ) (eq. (21)), with u(σ) the network's log-variance
    head; per sample its mean over the elements, as `LossOutput.loss` is for EDM's loss (the training step scales
    the batch mean by the element count, which gives EDM2's sum over a sample's elements).

    At the optimum over u, e^{u(σ)} = λ(σ)·E[(D − x0)²] per element: the q(σ) of the entropic schedule.
    The denoiser must accept `return_logvar=True` and then return (D, u) with u broadcastable to (B, 1, ...).
    """

    def __init__(self, P_mean: float = -0.4, P_std: float = 1.0, sigma_data: float = 0.5) -> None:
        super().__init__(P_mean, P_std, sigma_data)

    def __call__(
        self,
        denoiser: Callable[..., Any],
        x0: Tensor,
        labels: Tensor | None = None,
        *,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        augment_labels: Tensor | None = None,
    ) -> LossOutput:
        """Loss of `denoiser(x, sigma, labels, return_logvar=True[, augment_labels=...])` on clean x0 (B, ...);
        arguments as EDMLoss (`augment_labels`: the augmentation's conditioning vector, None without one)."""
        batch, dtype = x0.shape[0], _compute_dtype(x0.dtype)
        sigma, x_sigma = self.noisy(x0, sigma, noise, generator)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        d, logvar = denoiser(x_sigma, sigma, labels, return_logvar=True, **extra)
        sq = (d.to(dtype) - x0.to(dtype)).square().reshape(batch, -1)
        u = logvar.to(dtype).reshape(batch, 1)
        weight = self.weight(sigma)
        # eq. (21): per element λ(σ)/e^u · (D − x0)² + u, averaged over the elements of a sample
        loss = (weight.reshape(batch, 1) * (-u).exp() * sq + u).mean(dim=1)
        return LossOutput(loss=loss, sigma=sigma, mse=sq.detach().mean(dim=1), weight=weight)


LOSSES: dict[str, type[EDMLoss]] = {"edm": EDMLoss, "edm2": EDM2Loss}
"""Training losses by `loss.kind`."""


def has_logvar_head(net: torch.nn.Module) -> bool:
    """Whether `net` carries EDM2's log-variance head (a `logvar(sigma)` method and `return_logvar` in forward)."""
    return callable(getattr(net, "logvar", None))
