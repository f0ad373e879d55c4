"""EDM2's magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training Dynamics of
Diffusion Models", Fig. 21), computing what NVlabs edm2's `training/networks_edm2.py` computes, with the same
parameter and buffer names (`EDM2UNet` = their `UNet`), so their state_dicts load as they are.

Every layer is magnitude-preserving (MP): unit-variance inputs give unit-variance outputs at initialisation.
The weights of `MPConv` are normalised at every use and, in training mode, also overwritten in place by their
normalised value (forced weight normalisation), a deterministic operation that every DDP rank repeats.
Backbone contract of this package: F(x, c_noise, labels=None, augment_labels=None) with labels integer class
ids (B,) or None (the all-zero label on a conditional network, as edm2's preconditioner passes it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.dropout import dropout
from evodiff_pl.networks.unet_blocks import check_levels, one_hot_labels

PRESETS: dict[str, dict[str, Any]] = {
    **{f"img512-{name}": dict(model_channels=c, dropout=p) for name, c, p in
       [("xxs", 64, 0.0), ("xs", 128, 0.0), ("s", 192, 0.0), ("m", 256, 0.1), ("l", 320, 0.1), ("xl", 384, 0.1),
        ("xxl", 448, 0.1)]},
    **{f"img64-{name}": dict(model_channels=c, dropout=p) for name, c, p in
       [("xs", 128, 0.0), ("s", 192, 0.0), ("m", 256, 0.1), ("l", 320, 0.1), ("xl", 384, 0.1)]},
    "tiny": dict(model_channels=16, channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), channels_per_head=16),
    "small": dict(model_channels=32, channel_mult=(1, 2, 2), num_blocks=2, attn_resolutions=(8,),
                  channels_per_head=32),
}
"""`preset=` values: edm2's train_edm2.py presets (edm2-img512-* on 64x64x4 latents, edm2-img64-* on ImageNet-64
pixels; they set the width and dropout on top of the defaults) and two for the CPU."""
DEFAULTS: dict[str, Any] = dict(model_channels=192, channel_mult=(1, 2, 3, 4), num_blocks=3,
                                attn_resolutions=(16, 8), channels_per_head=64, dropout=0.0)
"""edm2's UNet/Block defaults of the settings a preset may change."""


def normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """x over (eps + ‖x‖/√(numel over dim)) along `dim` (all but the first by default): unit RMS; the norm in
    float32 (float64 for float64 x)."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=dtype)
    norm = torch.add(eps, norm, alpha=math.sqrt(norm.numel() / x.numel()))
    return x / norm.to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """SiLU scaled to unit output magnitude (EDM2 eq. (81))."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """(1 − t)·a + t·b over √((1 − t)² + t²) (EDM2 eq. (88))."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, dim: int = 1, t: float = 0.5) -> Tensor:
    """Concatenation weighted (1 − t, t), each part scaled by its own width, to unit magnitude (EDM2 eq. (103))."""
    na, nb = a.shape[dim], b.shape[dim]
    c = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([c / math.sqrt(na) * (1 - t) * a, c / math.sqrt(nb) * t * b], dim=dim)


def resample(x: Tensor, f: Sequence[float] = (1, 1), mode: str = "keep") -> Tensor:
    """Depthwise up/down-sampling by 2 with the separable FIR filter f (normalised), or x as is for 'keep'."""
    if mode == "keep":
        return x
    f1 = torch.as_tensor(f, dtype=torch.float32)
    pad = (len(f) - 1) // 2
    f1 = f1 / f1.sum()
    kernel = torch.outer(f1, f1).to(x.dtype).to(x.device)[None, None].tile(x.shape[1], 1, 1, 1)
    if mode == "down":
        return F.conv2d(x, kernel, groups=x.shape[1], stride=2, padding=(pad,))
    return F.conv_transpose2d(x, kernel * 4, groups=x.shape[1], stride=2, padding=(pad,))


def mp_conv(x: Tensor, weight: Tensor, gain: Tensor | float = 1) -> Tensor:
    """x through the normalised weight scaled by gain/√fan_in (EDM2 eq. (47)): a linear map for a 2-d weight,
    a same-padded convolution for a 4-d one."""
    w = normalize(weight)
    w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
    if w.ndim == 2:
        return x @ w.t()
    return F.conv2d(x, w, padding=(w.shape[-1] // 2,))


class MPFourier(nn.Module):
    """√2·cos(2π(f·x + φ)) with fixed f ~ N(0, bandwidth²), φ ~ U[0, 1) (EDM2 eq. (75)); buffers `freqs`,
    `phases` hold 2πf and 2πφ. Computed in float32, returned in x's dtype."""

    def __init__(self, num_channels: int, bandwidth: float = 1) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(num_channels) * bandwidth)
        self.register_buffer("phases", 2 * math.pi * torch.rand(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        y = torch.outer(x.to(torch.float32), self.freqs.to(torch.float32)) + self.phases.to(torch.float32)
        return (y.cos() * math.sqrt(2)).to(x.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving linear layer (kernel ()) or k x k convolution, no bias, parameter `weight` ~ N(0, 1).

    In training mode every call first overwrites the weight with its normalised value (forced weight
    normalisation, EDM2 eq. (66)); the output is then computed from that very tensor, the freshly normalised
    weight, as in edm2. The weight is used in float32 (edm2's precision, also for float16/bfloat16 weights) or in
    float64 for a float64 weight, so a float64 run normalises without float32 rounding."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: Tensor | float = 1) -> Tensor:
        w = self.weight.to(torch.promote_types(self.weight.dtype, torch.float32))
        if self.training:
            with torch.no_grad():
                self.weight.copy_(normalize(w))
        return mp_conv(x, w, gain)


class Block(nn.Module):
    """Encoder ('enc') or decoder ('dec') block of EDM2 (Fig. 21): optional resampling, (encoder) 1x1 skip
    projection and pixel norm, residual branch conv–(emb-modulated) conv with dropout, MP sum with balance
    `res_balance`, optional cosine self-attention with balance `attn_balance`, output clipped to ±clip_act."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, flavor: str = "enc",
                 resample_mode: str = "keep", resample_filter: Sequence[float] = (1, 1), attention: bool = False,
                 channels_per_head: int = 64, dropout: float = 0.0, res_balance: float = 0.3,
                 attn_balance: float = 0.3, clip_act: float | None = 256) -> None:
        super().__init__()
        self.out_channels = out_channels
        self.flavor = flavor
        self.resample_filter = tuple(resample_filter)
        self.resample_mode = resample_mode
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, kernel=(3, 3))
        self.emb_linear = MPConv(emb_channels, out_channels, kernel=())
        self.conv_res1 = MPConv(out_channels, out_channels, kernel=(3, 3))
        self.conv_skip = MPConv(in_channels, out_channels, kernel=(1, 1)) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, out_channels * 3, kernel=(1, 1)) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, kernel=(1, 1)) if self.num_heads else None

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)  # pixel norm
        y = self.conv_res0(mp_silu(x))
        c = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = mp_silu(y * c[:, :, None, None].to(y.dtype))
        y = dropout(y, self.dropout, self.training)
        y = self.conv_res1(y)
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, t=self.res_balance)
        if self.num_heads:
            # edm2's qkv layout: channel (head, c, j) with j = 0, 1, 2 for q, k, v is head·3C_h + 3c + j
            y = self.attn_qkv(x)
            y = y.reshape(y.shape[0], self.num_heads, -1, 3, y.shape[2] * y.shape[3])
            q, k, v = normalize(y, dim=2).unbind(3)  # cosine attention: q, k, v of unit RMS per position
            w = torch.einsum("nhcq,nhck->nhqk", q, k / math.sqrt(q.shape[2])).softmax(dim=3)
            y = torch.einsum("nhqk,nhck->nhcq", w, v)
            x = mp_sum(x, self.attn_proj(y.reshape(*x.shape)), t=self.attn_balance)
        if self.clip_act is not None:
            x = x.clip(-self.clip_act, self.clip_act)
        return x


class EDM2UNet(nn.Module):
    """EDM2's U-Net (edm2's `UNet`): MP Fourier noise embedding and label embedding, encoder blocks
    enc['RxR_conv' | 'RxR_down' | 'RxR_blockI'], decoder dec['RxR_in0' | 'RxR_in1' | 'RxR_up' | 'RxR_blockI'] fed
    the skips by MP concatenation, output conv with learned gain `out_gain` (0 at init: F starts at 0)."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        preset: str | None = None,
        model_channels: int | None = None,
        channel_mult: Sequence[int] | None = None,
        channel_mult_noise: int | None = None,
        channel_mult_emb: int | None = None,
        num_blocks: int | None = None,
        attn_resolutions: Sequence[int] | None = None,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        channels_per_head: int | None = None,
        dropout: float | None = None,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        """
        Args:
            img_resolution: input/output height = width; divisible by 2^(len(channel_mult) - 1).
            in_channels, out_channels: channels of x and of F (edm2's img_channels for both).
            label_dim: number of classes; 0 = unconditional.
            preset: a name in PRESETS; it sets the settings below that are left at None (the others: DEFAULTS).
            model_channels: base width; level i has model_channels·channel_mult[i] channels.
            channel_mult: per-level width multipliers.
            channel_mult_noise, channel_mult_emb: widths of the noise embedding and of the embedding vector, in
                units of model_channels; None = the first level's and the widest level's width.
            num_blocks: blocks per level in the encoder (the decoder has one more).
            attn_resolutions: resolutions whose blocks carry self-attention; the bottleneck's first block always does.
            label_balance, concat_balance, res_balance, attn_balance: the t of the MP sums/concatenations.
            channels_per_head: attention head width (a block narrower than this has no attention).
            dropout: dropout probability in every block's residual branch (training mode).
            clip_act: clip every block's output to ±clip_act; None = no clipping.
            resample_filter: up/down-sampling FIR filter.
        """
        super().__init__()
        if preset is not None and preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; valid: {sorted(PRESETS)}")
        given = dict(model_channels=model_channels, channel_mult=channel_mult, num_blocks=num_blocks,
                     attn_resolutions=attn_resolutions, channels_per_head=channels_per_head, dropout=dropout)
        cfg = {**DEFAULTS, **(PRESETS[preset] if preset else {}), **{k: v for k, v in given.items() if v is not None}}
        check_levels(img_resolution, cfg["channel_mult"], cfg["attn_resolutions"])
        mc = cfg["model_channels"]
        cblock = [mc * m for m in cfg["channel_mult"]]
        cnoise = mc * channel_mult_noise if channel_mult_noise is not None else cblock[0]
        cemb = mc * channel_mult_emb if channel_mult_emb is not None else max(cblock)
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        self.out_gain = nn.Parameter(torch.zeros([]))
        block = dict(resample_filter=resample_filter, channels_per_head=cfg["channels_per_head"],
                     dropout=cfg["dropout"], res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)

        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, kernel=())
        self.emb_label = MPConv(label_dim, cemb, kernel=()) if label_dim else None

        self.enc = nn.ModuleDict()
        cout = in_channels + 1  # x and a constant-one channel
        for level, channels in enumerate(cblock):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_conv"] = MPConv(cin, cout, kernel=(3, 3))
            else:
                self.enc[f"{res}x{res}_down"] = Block(cout, cout, cemb, flavor="enc", resample_mode="down", **block)
            for idx in range(cfg["num_blocks"]):
                cin, cout = cout, channels
                self.enc[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="enc",
                                                            attention=res in cfg["attn_resolutions"], **block)

        self.dec = nn.ModuleDict()
        skips = [blk.out_channels for blk in self.enc.values()]
        for level, channels in reversed(list(enumerate(cblock))):
            res = img_resolution >> level
            if level == len(cblock) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(cout, cout, cemb, flavor="dec", attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = Block(cout, cout, cemb, flavor="dec", **block)
            else:
                self.dec[f"{res}x{res}_up"] = Block(cout, cout, cemb, flavor="dec", resample_mode="up", **block)
            for idx in range(cfg["num_blocks"] + 1):
                cin, cout = cout + skips.pop(), channels
                self.dec[f"{res}x{res}_block{idx}"] = Block(cin, cout, cemb, flavor="dec",
                                                            attention=res in cfg["attn_resolutions"], **block)
        self.out_conv = MPConv(cout, out_channels, kernel=(3, 3))
        self._enc_is_conv = ["conv" in name for name in self.enc]
        self._dec_takes_skip = ["block" in name for name in self.dec]

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,), labels (B,) class ids or None -> F (B, out_channels, H, W)."""
        if augment_labels is not None:
            raise ValueError("EDM2's U-Net takes no augmentation labels")
        emb = self.emb_noise(self.emb_fourier(c_noise))
        if self.emb_label is not None:
            class_labels = one_hot_labels(labels, self.label_dim, x.shape[0], emb)
            emb = mp_sum(emb, self.emb_label(class_labels * math.sqrt(self.label_dim)), t=self.label_balance)
        elif labels is not None:
            raise ValueError("labels were given to an unconditional network (label_dim=0)")
        emb = mp_silu(emb)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for is_conv, blk in zip(self._enc_is_conv, self.enc.values()):
            x = blk(x) if is_conv else blk(x, emb)
            skips.append(x)
        for takes_skip, blk in zip(self._dec_takes_skip, self.dec.values()):
            if takes_skip:
                x = mp_cat(x, skips.pop(), t=self.concat_balance)
            x = blk(x, emb)
        return self.out_conv(x, gain=self.out_gain)
