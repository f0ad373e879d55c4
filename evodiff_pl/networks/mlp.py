"""Residual MLP backbone F(x, c_noise, labels) for vector data (B, dim), e.g. the Gaussian-mixture testbed."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.dropout import Dropout
from evodiff_pl.networks.layers import ZERO_INIT, ConditionEmbedding, linear


class MLPBlock(nn.Module):
    """Pre-norm residual block: h + W2·dropout(SiLU(W1·LN(h) + A·emb)), W2 initialised near zero."""

    def __init__(self, hidden: int, emb_channels: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc0 = linear(hidden, hidden)
        self.affine = linear(emb_channels, hidden)
        self.dropout = Dropout(dropout)
        self.fc1 = linear(hidden, hidden, scale=ZERO_INIT)

    def forward(self, h: Tensor, emb: Tensor) -> Tensor:
        return h + self.fc1(self.dropout(F.silu(self.fc0(self.norm(h)) + self.affine(emb))))


class MLPDenoiser(nn.Module):
    """x -> linear -> `depth` residual blocks conditioned on the noise (and label) embedding -> LN-SiLU-linear."""

    def __init__(
        self,
        dim: int,
        hidden: int = 256,
        depth: int = 3,
        emb_dim: int = 64,
        label_dim: int = 0,
        dropout: float = 0.0,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
    ) -> None:
        """
        Args:
            dim: data dimension D of x (B, D).
            hidden: width of the residual stream.
            depth: number of residual blocks.
            emb_dim: width of the noise embedding; the embedding MLP maps it to `hidden`.
            label_dim: number of classes; 0 = unconditional.
            dropout: dropout probability inside every block.
            label_dropout: per-sample probability of dropping the label in training (classifier-free guidance).
            embedding_type: "positional" or "fourier" noise embedding.
        """
        super().__init__()
        self.embed = ConditionEmbedding(embedding_type, emb_dim, hidden, label_dim, label_dropout)
        self.inp = linear(dim, hidden)
        self.blocks = nn.ModuleList(MLPBlock(hidden, hidden, dropout) for _ in range(depth))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = linear(hidden, dim, scale=ZERO_INIT)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, dim), c_noise (B,), labels (B,) class ids or None (the null label) -> (B, dim)."""
        emb = self.embed(c_noise, labels)
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.out_norm(h)))
