"""DDPM++ U-Net (Song et al. 2021) in the layout of EDM's SongUNet (Karras et al. 2022, config F)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.layers import ZERO_INIT, ConditionEmbedding, conv2d, group_norm, linear

ATTN_INIT = math.sqrt(0.2)
"""Scale of the Xavier init of the attention qkv projection (EDM)."""


class UNetBlock(nn.Module):
    """DDPM++ residual block: GN-SiLU-conv, + noise embedding, GN-SiLU-dropout-conv, skip, optional self-attention.

    `down`/`up` resample by 2 (2x2 average pool / nearest, i.e. the [1, 1] filter of DDPM++) before conv0
    and in the 1x1 skip projection. With `adaptive_scale` the embedding gives a scale and a shift of the
    normalised activations (FiLM, ADM); without, a shift only (DDPM++, EDM config F).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        *,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        adaptive_scale: bool = False,
    ) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a block resamples up or down, not both")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.adaptive_scale = adaptive_scale
        self.norm0 = group_norm(in_channels)
        self.conv0 = conv2d(in_channels, out_channels, 3)
        self.affine = linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv1 = conv2d(out_channels, out_channels, 3, scale=ZERO_INIT)
        self.skip = conv2d(in_channels, out_channels, 1) if (in_channels != out_channels or up or down) else None
        self.attention = attention
        if attention:
            self.norm2 = group_norm(out_channels)
            self.qkv = conv2d(out_channels, 3 * out_channels, 1, scale=ATTN_INIT)
            self.proj = conv2d(out_channels, out_channels, 1, scale=ZERO_INIT)

    def extra_repr(self) -> str:
        return f"up={self.up}, down={self.down}, attention={self.attention}"

    def _resample(self, x: Tensor) -> Tensor:
        if self.up:
            return F.interpolate(x, scale_factor=2.0, mode="nearest")
        if self.down:
            return F.avg_pool2d(x, 2)
        return x

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = self._resample(x)
        h = self.conv0(self._resample(F.silu(self.norm0(x))))
        params = self.affine(emb)[:, :, None, None].to(h.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            h = F.silu(torch.addcmul(shift, self.norm1(h), scale + 1))
        else:
            h = F.silu(self.norm1(h + params))
        h = self.conv1(self.dropout(h))
        # x ← (branch + skip(x))/√2, and likewise after attention (DDPM++ skip_rescale, Song et al. 2021)
        x = (h + (self.skip(orig) if self.skip is not None else orig)) * math.sqrt(0.5)
        if self.attention:
            b, c, hh, ww = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b, 3, 1, c, hh * ww).transpose(-1, -2).unbind(1)
            a = F.scaled_dot_product_attention(q, k, v)  # softmax(q kᵀ/√c) v, one head (DDPM++)
            x = (self.proj(a.transpose(-1, -2).reshape(b, c, hh, ww)) + x) * math.sqrt(0.5)
        return x


class SongUNet(nn.Module):
    """DDPM++ backbone F(x, c_noise, labels) of EDM; the CIFAR-10 config F has 55.73M parameters.

    Encoder: a 3x3 conv, then per level (resolution halved after the first) a down block and
    `num_blocks` blocks; decoder: two bottleneck blocks (the first with attention), then per level an up
    block and `num_blocks + 1` blocks fed the concatenated encoder activations; GN-SiLU-conv to the output.
    """

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        adaptive_scale: bool = False,
    ) -> None:
        """
        Args:
            img_resolution: input/output height = width; divisible by 2^(len(channel_mult) - 1).
            in_channels: channels of x.
            out_channels: channels of F (= in_channels under EDMPrecond).
            label_dim: number of classes; 0 = unconditional.
            model_channels: base width; level i has model_channels·channel_mult[i] channels.
            channel_mult: per-level width multipliers; one level per entry.
            channel_mult_emb: width of the noise/label embedding vector, in units of model_channels.
            num_blocks: residual blocks per level in the encoder (the decoder has one more).
            attn_resolutions: resolutions (of those the U-Net has) whose blocks carry self-attention; the
                bottleneck always does.
            dropout: dropout probability before the second conv of every block (0.13 for CIFAR-10).
            label_dropout: per-sample probability of dropping the label in training (classifier-free guidance).
            embedding_type: "positional" (DDPM++) or "fourier" (NCSN++) noise embedding.
            channel_mult_noise: width of the noise embedding, in units of model_channels (1 DDPM++, 2 NCSN++).
            adaptive_scale: scale-and-shift (FiLM) conditioning instead of DDPM++'s shift.
        """
        super().__init__()
        levels = len(channel_mult)
        if levels < 1:
            raise ValueError("channel_mult needs at least one level")
        if img_resolution % (1 << (levels - 1)):
            factor = 1 << (levels - 1)
            raise ValueError(f"img_resolution={img_resolution} must be divisible by 2^(len(channel_mult) - 1) = {factor}")
        resolutions = [img_resolution >> level for level in range(levels)]
        if not set(attn_resolutions) <= set(resolutions):
            raise ValueError(f"attn_resolutions={tuple(attn_resolutions)} must be among the U-Net's resolutions {resolutions}")
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        block = dict(emb_channels=emb_channels, dropout=dropout, adaptive_scale=adaptive_scale)

        self.embed = ConditionEmbedding(embedding_type, noise_channels, emb_channels, label_dim, label_dropout)

        self.enc_in = conv2d(in_channels, model_channels, 3)
        self.enc = nn.ModuleList()
        skips = [model_channels]
        cout = model_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level > 0:
                self.enc.append(UNetBlock(cout, cout, down=True, **block))
                skips.append(cout)
            for _ in range(num_blocks):
                self.enc.append(UNetBlock(cout, model_channels * mult, attention=res in attn_resolutions, **block))
                cout = model_channels * mult
                skips.append(cout)

        self.dec = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == levels - 1:
                self.dec.append(UNetBlock(cout, cout, attention=True, **block))
                self.dec.append(UNetBlock(cout, cout, **block))
            else:
                self.dec.append(UNetBlock(cout, cout, up=True, **block))
            for idx in range(num_blocks + 1):
                attn = idx == num_blocks and res in attn_resolutions
                self.dec.append(UNetBlock(cout + skips.pop(), model_channels * mult, attention=attn, **block))
                cout = model_channels * mult
        self.out_norm = group_norm(cout)
        self.out_conv = conv2d(cout, out_channels, 3, scale=ZERO_INIT)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,), labels (B,) class ids or None (null label) -> F like x."""
        emb = self.embed(c_noise, labels)
        x = self.enc_in(x)
        skips = [x]
        for blk in self.enc:
            x = blk(x, emb)
            skips.append(x)
        for blk in self.dec:
            if blk.in_channels != x.shape[1]:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))
