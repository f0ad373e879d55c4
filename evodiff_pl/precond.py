"""EDM preconditioning and training loss (Karras et al. 2022, Table 1 and eq. (2)/(8))."""

from __future__ import annotations

from typing import Callable, NamedTuple

import torch
from torch import Tensor, nn


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _per_sample(sigma: Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """sigma as a (B,) tensor of `dtype`, from a (B,)-shaped, one-element or scalar input."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1)
    if s.numel() not in (1, batch):
        raise ValueError(f"sigma must be a scalar or have {batch} elements (one per sample), got {s.numel()}")
    return s.expand(batch)


class EDMPrecond(nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise, labels) around any backbone F (EDM Table 1).

    The coefficients and the skip/out combination run in float32 (float64 for float64 x) with autocast
    off; F itself runs under the caller's autocast. Output dtype = x's dtype. Usable as a solver
    denoiser `D(x, sigma)`; sigma > 0 is a scalar or one value per sample.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for noise levels sigma, elementwise in sigma's dtype."""
        sd2 = self.sigma_data**2
        # EDM Table 1: c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None) -> Tensor:
        dtype = _compute_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            s = _per_sample(sigma, x.shape[0], dtype, x.device)
            c_skip, c_out, c_in, c_noise = (c.reshape(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(s))
            x_in = c_in * x.to(dtype)
        f = self.backbone(x_in, c_noise.reshape(-1), labels)
        with torch.autocast(x.device.type, enabled=False):
            return (c_skip * x.to(dtype) + c_out * f.to(dtype)).to(x.dtype)


class LossOutput(NamedTuple):
    """Per-sample EDM loss terms, all (B,)."""

    loss: Tensor
    """λ(σ)·mean over elements of (D − x0)²; differentiable, unreduced."""
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

    def __call__(
        self,
        denoiser: Callable[..., Tensor],
        x0: Tensor,
        labels: Tensor | None = None,
        *,
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
        generator: torch.Generator | None = None,
    ) -> LossOutput:
        """Loss of `denoiser(x, sigma[, labels])` on clean data x0 (B, ...).

        sigma (scalar or (B,)) and noise (x0's shape) default to fresh draws from `generator`; pass
        them to use common random numbers. Outputs are float32 (float64 for float64 x0).
        """
        batch = x0.shape[0]
        dtype = _compute_dtype(x0.dtype)
        if sigma is None:
            sigma = self.sample_sigma(batch, device=x0.device, generator=generator)
        sigma = _per_sample(sigma, batch, dtype, x0.device)
        if noise is None:
            noise = torch.randn(x0.shape, dtype=x0.dtype, device=x0.device, generator=generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} != x0 shape {tuple(x0.shape)}")
        s = sigma.reshape(-1, *([1] * (x0.ndim - 1)))
        x_sigma = (x0.to(dtype) + s * noise.to(dtype)).to(x0.dtype)
        d = denoiser(x_sigma, sigma) if labels is None else denoiser(x_sigma, sigma, labels)
        err = (d.to(dtype) - x0.to(dtype)).square().reshape(batch, -1).mean(dim=1)
        weight = self.weight(sigma)
        return LossOutput(loss=weight * err, sigma=sigma, mse=err.detach(), weight=weight)
