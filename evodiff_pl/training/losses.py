"""The training losses: EDM's (Karras et al. 2022, eq. (2)) and EDM2's learned-uncertainty loss (Karras et al. 2024,
eqs. (14)-(16), (21)), by `loss.kind`.

EDM's loss and EDM2's share the σ distribution ln σ ~ N(P_mean, P_std²), λ(σ)
and `LossOutput`, so the per-σ tracker reads the same `mse` and `weight` from either.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import torch
from torch import Tensor

from evodiff_pl.networks.precond import compute_dtype, per_sample_sigma


class LossOutput(NamedTuple):
    """Per-sample EDM loss terms, all (B,)."""

    loss: Tensor
    """λ(σ)·mean over elements of (D − x0)²; differentiable, unreduced. Training differentiates its batch mean
    times the number of elements (EDM's sum over a sample's elements; `evodiff_pl.training.module`)."""
    sigma: Tensor
    """Noise level of each sample."""
    mse: Tensor
    """Mean over elements of (D − x0)² in x0 space; detached."""
    weight: Tensor
    """λ(σ)."""


class EDMLoss:
    """EDM training loss: ln σ ~ N(P_mean, P_std²), per-sample λ(σ)·‖D(x0 + σn, σ) − x0‖²/numel (eq. (2)/(8))."""

    def __init__(self, P_mean: float = -1.2, P_std: float = 1.2, sigma_data: float = 0.5) -> None:
        self.P_mean = float(P_mean)
        self.P_std = float(P_std)
        self.sigma_data = float(sigma_data)

    def sample_sigma(self, n: int, *, device: torch.device | str, generator: torch.Generator | None = None) -> Tensor:
        """n float32 noise levels with ln σ ~ N(P_mean, P_std²) (EDM Table 1, "Noise distribution")."""
        return (torch.randn(n, device=device, generator=generator) * self.P_std + self.P_mean).exp()

    def weight(self, sigma: Tensor) -> Tensor:
        """λ(σ) = (σ² + σ_d²)/(σ·σ_d)² = 1/c_out² (EDM Table 1, "Loss weighting")."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def noisy(self, x0: Tensor, sigma: Tensor | float | None, noise: Tensor | None,
              generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(σ per sample, x_σ = x0 + σ·n) for the given σ and noise, or fresh draws from `generator` (docs/method.md
        §0); σ is float32 (float64 for float64 x0), x_σ has x0's dtype."""
        batch, dtype = x0.shape[0], compute_dtype(x0.dtype)
        if sigma is None:
            sigma = self.sample_sigma(batch, device=x0.device, generator=generator)
        sigma = per_sample_sigma(sigma, batch, dtype, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        return sigma, (x0.to(dtype) + s * noise.to(dtype)).to(x0.dtype)

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        x0: Tensor,
        labels: Tensor | None = None,
        *,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
        augment_labels: Tensor | None = None,
    ) -> LossOutput:
        """Loss of `denoiser(x, sigma[, labels][, augment_labels=...])` on clean data x0 (B, ...).

        sigma (scalar or (B,)) and noise (x0's shape) default to fresh draws from `generator`; pass
        them to use common random numbers. x0 is the (augmented) training image and `augment_labels` its
        augmentation's conditioning vector (`evodiff_pl.data.augment`), None without augmentation. Outputs are float32
        (float64 for float64 x0).
        """
        batch, dtype = x0.shape[0], compute_dtype(x0.dtype)
        sigma, x_sigma = self.noisy(x0, sigma, noise, generator)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        d = denoiser(x_sigma, sigma, **extra) if labels is None else denoiser(x_sigma, sigma, labels, **extra)
        err = (d.to(dtype) - x0.to(dtype)).square().reshape(batch, -1).mean(dim=1)
        weight = self.weight(sigma)
        return LossOutput(loss=weight * err, sigma=sigma, mse=err.detach(), weight=weight)


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
        batch, dtype = x0.shape[0], compute_dtype(x0.dtype)
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

