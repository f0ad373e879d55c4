"""Pieces of the MLP backbone and the noise embeddings shared with the U-Nets: initialised linear layer, noise and
label embeddings."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.dropout import keep_samples


ZERO_INIT = 1e-5
"""Init scale of every layer that closes a residual branch and of the output layer (EDM): F starts near 0."""


def _xavier(layer: nn.Linear | nn.Conv2d, scale: float) -> nn.Linear | nn.Conv2d:
    nn.init.xavier_uniform_(layer.weight, gain=scale)
    if layer.bias is not None:
        nn.init.zeros_(layer.bias)
    return layer


def linear(in_features: int, out_features: int, *, scale: float = 1.0, bias: bool = True) -> nn.Linear:
    """nn.Linear with EDM's init: Xavier-uniform weight times `scale`, zero bias."""
    return _xavier(nn.Linear(in_features, out_features, bias=bias), scale)


class PositionalEmbedding(nn.Module):
    """Sinusoids [cos(x f_j), sin(x f_j)], f_j = (1/max_positions)^(j/(C/2 - endpoint)) (DDPM++, Vaswani et al. 2017).

    `endpoint=True` (DDPM++ in EDM's SongUNet, the MLP) puts the lowest frequency at 1/max_positions;
    False (ADM) stops one step short. Frequencies are float32 (as edm's), cast to x's dtype.
    """

    def __init__(self, num_channels: int, max_positions: float = 10_000.0, endpoint: bool = False) -> None:
        super().__init__()
        if num_channels % 2 or num_channels < 4:
            raise ValueError(f"positional embedding needs an even num_channels >= 4, got {num_channels}")
        half = num_channels // 2
        freqs = (1 / max_positions) ** (torch.arange(half, dtype=torch.float32) / (half - (1 if endpoint else 0)))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, self.freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features [cos(2π x f_j), sin(2π x f_j)], f_j ~ N(0, scale²) fixed (NCSN++, Tancik et al. 2020)."""

    def __init__(self, num_channels: int, scale: float = 16.0) -> None:
        super().__init__()
        if num_channels % 2:
            raise ValueError(f"Fourier embedding needs an even num_channels, got {num_channels}")
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


def noise_embedding(kind: str, num_channels: int) -> nn.Module:
    """The noise-level embedding `kind` ("positional" for DDPM++, "fourier" for NCSN++) of width num_channels."""
    if kind == "positional":
        return PositionalEmbedding(num_channels, endpoint=True)
    if kind == "fourier":
        return FourierEmbedding(num_channels)
    raise ValueError(f"unknown embedding_type {kind!r}; valid: ['fourier', 'positional']")


class LabelEmbedding(nn.Module):
    """Class ids -> one-hot·√label_dim -> linear (EDM's `map_label`); dropped or missing labels embed to 0.

    `dropout` is the per-sample probability, in training mode, of replacing the label by the null label
    (classifier-free guidance); `labels=None` is the null label for the whole batch.
    """

    def __init__(self, label_dim: int, out_features: int, dropout: float = 0.0) -> None:
        super().__init__()
        if label_dim < 1:
            raise ValueError(f"label_dim must be >= 1, got {label_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"label dropout must be in [0, 1), got {dropout}")
        self.label_dim = label_dim
        self.dropout = dropout
        self.proj = linear(label_dim, out_features, bias=False)

    def forward(self, labels: Tensor | None, batch_size: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        if labels is None:
            return torch.zeros(batch_size, self.proj.out_features, device=device, dtype=dtype)
        if labels.shape != (batch_size,) or labels.dtype.is_floating_point:
            raise ValueError(
                f"labels must be integer class ids of shape ({batch_size},), got {labels.dtype} {tuple(labels.shape)}"
            )
        onehot = F.one_hot(labels, self.label_dim).to(dtype)
        if self.training and self.dropout:
            onehot = onehot * keep_samples(batch_size, self.dropout, device).to(dtype)
        return self.proj(onehot * math.sqrt(self.label_dim))


class ConditionEmbedding(nn.Module):
    """emb = SiLU(W1·SiLU(W0·(noise_embedding(c_noise) + label_embedding(labels)))) (EDM's mapping network)."""

    def __init__(
        self,
        embedding_type: str,
        noise_channels: int,
        emb_channels: int,
        label_dim: int = 0,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.map_noise = noise_embedding(embedding_type, noise_channels)
        self.map_label = LabelEmbedding(label_dim, noise_channels, label_dropout) if label_dim else None
        self.map_layer0 = linear(noise_channels, emb_channels)
        self.map_layer1 = linear(emb_channels, emb_channels)

    def forward(self, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        emb = self.map_noise(c_noise)
        if self.map_label is not None:
            emb = emb + self.map_label(labels, c_noise.shape[0], c_noise.device, emb.dtype)
        elif labels is not None:
            raise ValueError("labels were given to an unconditional network (label_dim=0)")
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))
