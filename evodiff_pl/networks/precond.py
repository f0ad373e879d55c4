"""Preconditionings (EDM, VP, VE, iDDPM; Karras et al. 2022, Table 1; EDM2's with its uncertainty head, Karras
et al. 2024) and the EDM training loss (eq. (2)/(8))."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from evodiff_pl.networks.edm2 import MPConv, MPFourier, mp_conv


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def per_sample_sigma(sigma: Tensor | float, batch: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """sigma as a (B,) tensor of `dtype`, from a (B,)-shaped, one-element or scalar input."""
    s = torch.as_tensor(sigma, dtype=dtype, device=device).reshape(-1)
    if s.numel() not in (1, batch):
        raise ValueError(f"sigma must be a scalar or have {batch} elements (one per sample), got {s.numel()}")
    return s.expand(batch)


class Precond(nn.Module):
    """D(x, σ) = c_skip·x + c_out·F(c_in·x, c_noise, labels) around any backbone F; subclasses give the c's.

    The coefficients and the skip/out combination run in float32 (float64 for float64 x) with autocast
    off; F itself runs under the caller's autocast. Output dtype = x's dtype. Usable as a solver
    denoiser `D(x, sigma)`; sigma > 0 is a scalar or one value per sample. `sigma_min`/`sigma_max`: the
    noise range the formulation supports (edm's attributes of the same names); `sigma_data`: σ_d of the data,
    used by the loss weight and the tracker.
    """

    sigma_min: float = 0.0
    sigma_max: float = float("inf")

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5) -> None:
        super().__init__()
        self.backbone = backbone
        self.sigma_data = float(sigma_data)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(c_skip, c_out, c_in, c_noise) for noise levels sigma, elementwise in sigma's dtype."""
        raise NotImplementedError

    def _output(self, f: Tensor, x: Tensor) -> Tensor:
        """The part of the backbone's output that enters D (all of it, except for iDDPM)."""
        return f

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """D(x, σ); `augment_labels` (B, 9) of `evodiff_pl.data.augment` reach backbones that take them (None = zero)."""
        dtype = compute_dtype(x.dtype)
        with torch.autocast(x.device.type, enabled=False):
            s = per_sample_sigma(sigma, x.shape[0], dtype, x.device)
            c_skip, c_out, c_in, c_noise = (torch.as_tensor(c, dtype=dtype, device=x.device).expand(s.shape)
                                            .reshape(-1, *([1] * (x.ndim - 1))) for c in self.coefficients(s))
            x_in = c_in * x.to(dtype)
        extra = {} if augment_labels is None else {"augment_labels": augment_labels}
        f = self._output(self.backbone(x_in, c_noise.reshape(-1), labels, **extra), x)
        with torch.autocast(x.device.type, enabled=False):
            return (c_skip * x.to(dtype) + c_out * f.to(dtype)).to(x.dtype)


class EDMPrecond(Precond):
    """EDM preconditioning (Karras et al. 2022, Table 1)."""

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        sd2 = self.sigma_data**2
        # EDM Table 1: c_skip = σ_d²/(σ²+σ_d²), c_out = σσ_d/√(σ²+σ_d²), c_in = 1/√(σ²+σ_d²), c_noise = ¼ ln σ
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sigma**2 + sd2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise


class EDM2Precond(EDMPrecond):
    """EDM2's preconditioner (Karras et al. 2024; edm2's `Precond`): EDM's c_skip, c_out, c_in and c_noise = ¼ ln σ
    around the backbone, plus the learned uncertainty head u(σ) = logvar_linear(logvar_fourier(c_noise)) of
    the loss ℓ = (λ(σ)/e^{u(σ)})·(D − y)² + u(σ) (EDM2 eq. (21)); parameter names as edm2's."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, logvar_channels: int = 128) -> None:
        super().__init__(backbone, sigma_data)
        self.logvar_fourier = MPFourier(logvar_channels)
        self.logvar_linear = MPConv(logvar_channels, 1, kernel=())

    def forward(self, x: Tensor, sigma: Tensor | float, labels: Tensor | None = None, return_logvar: bool = False,
                **kwargs: Any) -> Tensor | tuple[Tensor, Tensor]:
        """D(x, σ), or (D, u(σ)) with u shaped (B, 1, ..., 1) like x (float32; float64 for float64 x)."""
        d = super().forward(x, sigma, labels, **kwargs)
        if not return_logvar:
            return d
        with torch.autocast(x.device.type, enabled=False):
            s = per_sample_sigma(sigma, x.shape[0], compute_dtype(x.dtype), x.device)
            logvar = self.logvar_linear(self.logvar_fourier(s.log() / 4))  # training mode: forced weight norm
        return d, logvar.reshape(-1, *([1] * (x.ndim - 1)))

    def logvar(self, sigma: Tensor) -> Tensor:
        """u(σ) for a (K,) tensor of noise levels, (K,) float32 (float64 for float64 sigma); never updates the head's
        weight in place (its value as evaluated in eval mode)."""
        with torch.autocast(sigma.device.type, enabled=False):
            c_noise = sigma.to(compute_dtype(sigma.dtype)).reshape(-1).log() / 4
            return mp_conv(self.logvar_fourier(c_noise), self.logvar_linear.weight.to(torch.float32)).reshape(-1)


class VPPrecond(Precond):
    """Variance-preserving preconditioning (Song et al. 2021; EDM Table 1, "VP").

    σ(t) = √(exp(½β_d t² + β_min t) − 1), t ∈ [epsilon_t, 1]; c_noise = (M − 1)·t(σ).
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, beta_d: float = 19.9, beta_min: float = 0.1,
                 M: int = 1000, epsilon_t: float = 1e-5) -> None:
        super().__init__(backbone, sigma_data)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(torch.tensor(epsilon_t)))
        self.sigma_max = float(self.sigma(torch.tensor(1.0)))

    def sigma(self, t: Tensor) -> Tensor:
        """σ(t) of the VP SDE (EDM Table 1)."""
        return ((0.5 * self.beta_d * t**2 + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma: Tensor) -> Tensor:
        """t(σ) = (√(β_min² + 2β_d ln(1 + σ²)) − β_min)/β_d, the inverse of `sigma`."""
        return ((self.beta_min**2 + 2 * self.beta_d * (1 + sigma**2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # EDM Table 1 (VP): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = (M−1)·t(σ)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), (self.M - 1) * self.sigma_inv(sigma)


class VEPrecond(Precond):
    """Variance-exploding preconditioning (Song et al. 2021; EDM Table 1, "VE")."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, sigma_min: float = 0.02,
                 sigma_max: float = 100.0) -> None:
        super().__init__(backbone, sigma_data)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # EDM Table 1 (VE): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2)
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class iDDPMPrecond(Precond):
    """Improved-DDPM preconditioning (Nichol & Dhariwal 2021; EDM Table 1, "iDDPM"): c_noise is the index of the
    nearest of M discrete levels u_j; a backbone with 2·C output channels (mean and variance) has its first C used."""

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5, C_1: float = 0.001, C_2: float = 0.008,
                 M: int = 1000) -> None:
        super().__init__(backbone, sigma_data)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):
            # EDM Table 1: u_{j−1} = √((u_j² + 1)/max(ᾱ(j−1)/ᾱ(j), C_1) − 1)
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def alpha_bar(self, j: int | Tensor) -> Tensor:
        """ᾱ_j = sin²(π/2 · j/(M(C_2 + 1))) (EDM Table 1)."""
        return (0.5 * math.pi * torch.as_tensor(j) / self.M / (self.C_2 + 1)).sin() ** 2

    def round_sigma(self, sigma: Tensor, return_index: bool = False) -> Tensor:
        """The nearest level u_j to each σ (or its index j)."""
        u = self.u.to(torch.float32)
        index = (sigma.to(u.device, torch.float32).reshape(-1, 1) - u.reshape(1, -1)).abs().argmin(dim=1)
        out = index if return_index else self.u[index].to(sigma.dtype)
        return out.reshape(sigma.shape).to(sigma.device)

    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        # EDM Table 1 (iDDPM): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = M − 1 − argmin |u_j − σ|
        c_noise = (self.M - 1 - self.round_sigma(sigma, return_index=True)).to(sigma.dtype)
        return torch.ones_like(sigma), -sigma, 1 / (sigma**2 + 1).sqrt(), c_noise

    def _output(self, f: Tensor, x: Tensor) -> Tensor:
        return f[:, : x.shape[1]]


PRECONDS: dict[str, type[Precond]] = {"edm": EDMPrecond, "vp": VPPrecond, "ve": VEPrecond, "iddpm": iDDPMPrecond,
                                     "edm2": EDM2Precond}
"""Preconditionings by `model.precond` name."""


def build_precond(name: str, backbone: nn.Module, **kwargs: Any) -> Precond:
    """The preconditioning registered as `name` around `backbone`, with its constructor's keyword arguments."""
    if name not in PRECONDS:
        raise ValueError(f"unknown precond {name!r}; valid names: {sorted(PRECONDS)}")
    return PRECONDS[name](backbone, **kwargs)


def has_logvar_head(net: nn.Module) -> bool:
    """Whether `net` carries EDM2's log-variance head (a `logvar(sigma)` method and `return_logvar` in forward)."""
    return callable(getattr(net, "logvar", None))
