"""The layers of EDM's U-Nets (NVlabs edm `training/networks.py`, same parameter and buffer names): initialised
linear and convolution layers with optional FIR up/down-sampling, group norm, the residual U-Net block with
attention, and the label and level checks both U-Nets share."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.dropout import dropout, keep_samples

INIT_MODES = ("xavier_uniform", "xavier_normal", "kaiming_uniform", "kaiming_normal")


def _init_tensor(shape: Sequence[int], mode: str, fan_in: int, fan_out: int, scale: float) -> Tensor:
    """A fresh tensor of `shape` drawn by `mode` (Glorot & Bengio 2010 / He et al. 2015 bounds) times `scale`."""
    if mode not in INIT_MODES:
        raise ValueError(f"unknown init_mode {mode!r}; valid: {INIT_MODES}")
    if scale == 0:
        return torch.zeros(shape)
    uniform = mode.endswith("uniform")
    var = 2 / (fan_in + fan_out) if mode.startswith("xavier") else 1 / fan_in
    base = (torch.rand(shape) * 2 - 1) * math.sqrt(3 * var) if uniform else torch.randn(shape) * math.sqrt(var)
    return base * scale


class Linear(nn.Linear):
    """nn.Linear initialised as edm's Linear: weight by `init_mode` times init_weight, bias the same times init_bias."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, init_mode: str = "kaiming_normal",
                 init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__(in_features, out_features, bias=bias)
        fans = dict(mode=init_mode, fan_in=in_features, fan_out=out_features)
        with torch.no_grad():
            self.weight.copy_(_init_tensor((out_features, in_features), scale=init_weight, **fans))
            if bias:
                self.bias.copy_(_init_tensor((out_features,), scale=init_bias, **fans))


class Conv2d(nn.Module):
    """Same-padded k x k convolution, optionally preceded by up/down-sampling by 2 with the separable FIR filter
    `resample_filter` ([1, 1]: nearest / 2x2 box, DDPM++; [1, 3, 3, 1]: NCSN++); kernel 0 resamples only.
    `fused_resample` convolves at full resolution then downsamples (or upsamples then convolves with a smaller
    padding), as NCSN++'s residual encoder does. Parameters `weight`, `bias`, buffer `resample_filter` as edm."""

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False,
                 init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0) -> None:
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.fused_resample = fused_resample
        fans = dict(mode=init_mode, fan_in=in_channels * kernel * kernel, fan_out=out_channels * kernel * kernel)
        shape = (out_channels, in_channels, kernel, kernel)
        self.weight = nn.Parameter(_init_tensor(shape, scale=init_weight, **fans)) if kernel else None
        self.bias = nn.Parameter(_init_tensor((out_channels,), scale=init_bias, **fans)) if kernel and bias else None
        f = torch.as_tensor(resample_filter, dtype=torch.float32)
        # 2-D filter f fᵀ / (Σf)², so that resampling preserves the mean
        f = torch.outer(f, f)[None, None] / f.sum().square()
        self.register_buffer("resample_filter", f if up or down else None)

    def forward(self, x: Tensor) -> Tensor:
        w = self.weight.to(x.dtype) if self.weight is not None else None
        f = self.resample_filter.to(x.dtype) if self.resample_filter is not None else None
        w_pad = w.shape[-1] // 2 if w is not None else 0
        f_pad = (f.shape[-1] - 1) // 2 if f is not None else 0
        if self.fused_resample and self.up and w is not None:
            x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                   stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                x = F.conv_transpose2d(x, f.mul(4).tile([self.in_channels, 1, 1, 1]), groups=self.in_channels,
                                       stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                b = self.bias.to(x.dtype) if self.bias is not None else None
                return F.conv2d(x, w, b, padding=w_pad)
        if self.bias is not None:
            x = x.add_(self.bias.to(x.dtype).reshape(1, -1, 1, 1))
        return x


class GroupNorm(nn.GroupNorm):
    """nn.GroupNorm with min(num_groups, C // min_channels_per_group) groups (at least 1), as edm's GroupNorm."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4,
                 eps: float = 1e-5) -> None:
        groups = max(1, min(num_groups, num_channels // min_channels_per_group))
        if num_channels % groups:
            raise ValueError(f"GroupNorm: {num_channels} channels do not split into {groups} groups")
        super().__init__(groups, num_channels, eps=eps)


class UNetBlock(nn.Module):
    """Residual block of DDPM++/NCSN++/ADM: GN-SiLU-conv0 (resampling), + embedding (shift, or scale and shift
    with `adaptive_scale`), GN-SiLU-dropout-conv1, + skip, times skip_scale; then optional multi-head
    self-attention, again residual and times skip_scale."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True,
                 init: dict | None = None, init_zero: dict | None = None, init_attn: dict | None = None) -> None:
        super().__init__()
        init = init or {}
        init_zero = init_zero if init_zero is not None else dict(init_weight=0)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout = dropout
        self.skip_scale = float(skip_scale)
        self.adaptive_scale = adaptive_scale
        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter, **init)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1), **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3, **init_zero)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter,
                               **init)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1, **(init_attn if init_attn is not None else init))
            self.proj = Conv2d(out_channels, out_channels, 1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb)[:, :, None, None].to(x.dtype)
        if self.adaptive_scale:
            scale, shift = params.chunk(2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x.add_(params)))  # in place on conv0's output, which autograd does not keep
        x = self.conv1(dropout(x, self.dropout, self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            # softmax(qᵀk/√d) per head (Vaswani et al. 2017), one head per `channels_per_head` channels
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2).contiguous()  # NCHW order: a strided view would make the rest channels-last
            x = self.proj(a.reshape(b, c, h, w)).add_(x) * self.skip_scale
        return x


def one_hot_labels(labels: Tensor | None, label_dim: int, batch: int, like: Tensor) -> Tensor | None:
    """edm's class_labels from integer ids (B,): one-hot rows; None -> the all-zero label (conditional nets)."""
    if label_dim == 0:
        if labels is not None:
            raise ValueError("labels were given to an unconditional network (label_dim=0)")
        return None
    if labels is None:
        return torch.zeros(batch, label_dim, dtype=like.dtype, device=like.device)
    if labels.shape != (batch,) or labels.dtype.is_floating_point:
        raise ValueError(f"labels must be integer class ids of shape ({batch},), got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    return F.one_hot(labels, label_dim).to(like.dtype)


def drop_labels(class_labels: Tensor, p: float, training: bool) -> Tensor:
    """Classifier-free guidance training: each sample's label zeroed with probability p (training mode only)."""
    if not (training and p):
        return class_labels
    return class_labels * keep_samples(class_labels.shape[0], p, class_labels.device).to(class_labels.dtype)


def check_levels(img_resolution: int, channel_mult: Sequence[int], attn_resolutions: Sequence[int]) -> None:
    levels = len(channel_mult)
    if levels < 1:
        raise ValueError("channel_mult needs at least one level")
    if img_resolution % (1 << (levels - 1)):
        raise ValueError(f"img_resolution={img_resolution} must be divisible by 2^(len(channel_mult) - 1) = "
                         f"{1 << (levels - 1)}")
    resolutions = [img_resolution >> level for level in range(levels)]
    if not set(attn_resolutions) <= set(resolutions):
        raise ValueError(f"attn_resolutions={tuple(attn_resolutions)} must be among the U-Net's resolutions "
                         f"{resolutions}")
