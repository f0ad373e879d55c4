"""U-Nets of EDM (Karras et al. 2022): DDPM++/NCSN++ (`SongUNet`, Song et al. 2021) and ADM (`DhariwalUNet`,
Dhariwal & Nichol 2021), computing what NVlabs edm's `training/networks.py` computes, with the same parameter
and buffer names, so a state_dict of edm's networks loads as is (and ours into theirs).

Backbone contract of this package: F(x, c_noise, labels=None, augment_labels=None) with labels integer class
ids (B,) or None; they are turned into edm's one-hot class labels inside (None on a conditional network is the
all-zero label, as edm's preconditioners pass it).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.networks.layers import FourierEmbedding, PositionalEmbedding

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
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x.add_(self.skip(orig) if self.skip is not None else orig) * self.skip_scale
        if self.num_heads:
            b, c, h, w = x.shape
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, h * w).unbind(2)
            # softmax(qᵀk/√d) per head (Vaswani et al. 2017), one head per `channels_per_head` channels
            a = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
            a = a.transpose(1, 2).contiguous()  # NCHW order: a strided view would make the rest channels-last
            x = self.proj(a.reshape(b, c, h, w)).add_(x) * self.skip_scale
        return x


def _one_hot(labels: Tensor | None, label_dim: int, batch: int, like: Tensor) -> Tensor | None:
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


def _drop_labels(class_labels: Tensor, p: float, training: bool) -> Tensor:
    """Classifier-free guidance training: each sample's label zeroed with probability p (training mode only)."""
    if not (training and p):
        return class_labels
    keep = torch.rand(class_labels.shape[0], 1, device=class_labels.device) >= p
    return class_labels * keep.to(class_labels.dtype)


def _check_levels(img_resolution: int, channel_mult: Sequence[int], attn_resolutions: Sequence[int]) -> None:
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


class SongUNet(nn.Module):
    """DDPM++ (positional embedding, standard encoder, [1, 1] filter) and NCSN++ (fourier, channel_mult_noise=2,
    residual encoder, [1, 3, 3, 1]) of Song et al. 2021 as edm builds them; the CIFAR-10 config F has 55.73M
    parameters. Module names as edm's: map_* (embedding), enc['RxR_conv' | 'RxR_down' | 'RxR_blockI' |
    'RxR_aux_*'], dec['RxR_in0' | 'RxR_in1' | 'RxR_up' | 'RxR_blockI' | 'RxR_aux_*']."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: Sequence[int] = (1, 2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
        embedding_type: str = "positional",
        channel_mult_noise: int = 1,
        encoder_type: str = "standard",
        decoder_type: str = "standard",
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        """
        Args:
            img_resolution: input/output height = width; divisible by 2^(len(channel_mult) - 1).
            in_channels: channels of x.
            out_channels: channels of F (= in_channels under EDMPrecond).
            label_dim: number of classes; 0 = unconditional.
            augment_dim: width of the augmentation labels (`evodiff_pl.augment`: 9, set by data.augment > 0); 0 = none.
            model_channels: base width; level i has model_channels·channel_mult[i] channels.
            channel_mult: per-level width multipliers; one level per entry.
            channel_mult_emb: width of the embedding vector, in units of model_channels.
            num_blocks: residual blocks per level in the encoder (the decoder has one more).
            attn_resolutions: resolutions whose blocks carry self-attention; the bottleneck always does.
            dropout: dropout probability before the second conv of every block (0.13 for CIFAR-10).
            label_dropout: per-sample probability of dropping the label in training (classifier-free guidance).
            embedding_type: "positional" (DDPM++) or "fourier" (NCSN++) noise embedding.
            channel_mult_noise: width of the noise embedding, in units of model_channels (1 DDPM++, 2 NCSN++).
            encoder_type: "standard" (DDPM++), "skip" or "residual" (NCSN++): how the input image is fed to
                the lower levels.
            decoder_type: "standard" or "skip" (an output image summed over the levels).
            resample_filter: up/down-sampling FIR filter, [1, 1] (DDPM++) or [1, 3, 3, 1] (NCSN++).
        """
        super().__init__()
        if embedding_type not in ("positional", "fourier"):
            raise ValueError(f"unknown embedding_type {embedding_type!r}; valid: ['fourier', 'positional']")
        if encoder_type not in ("standard", "skip", "residual"):
            raise ValueError(f"unknown encoder_type {encoder_type!r}; valid: ['residual', 'skip', 'standard']")
        if decoder_type not in ("standard", "skip"):
            raise ValueError(f"unknown decoder_type {decoder_type!r}; valid: ['skip', 'standard']")
        _check_levels(img_resolution, channel_mult, attn_resolutions)
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        noise_channels = model_channels * channel_mult_noise
        init = dict(init_mode="xavier_uniform")
        init_zero = dict(init_mode="xavier_uniform", init_weight=1e-5)
        init_attn = dict(init_mode="xavier_uniform", init_weight=math.sqrt(0.2))
        block = dict(emb_channels=emb_channels, num_heads=1, dropout=dropout, skip_scale=math.sqrt(0.5), eps=1e-6,
                     resample_filter=resample_filter, resample_proj=True, adaptive_scale=False,
                     init=init, init_zero=init_zero, init_attn=init_attn)

        self.map_noise = (PositionalEmbedding(noise_channels, endpoint=True) if embedding_type == "positional"
                          else FourierEmbedding(noise_channels))
        self.map_label = Linear(label_dim, noise_channels, **init) if label_dim else None
        self.map_augment = Linear(augment_dim, noise_channels, bias=False, **init) if augment_dim else None
        self.map_layer0 = Linear(noise_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)

        self.enc = nn.ModuleDict()
        cout = caux = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
                if encoder_type == "skip":
                    self.enc[f"{res}x{res}_aux_down"] = Conv2d(caux, caux, 0, down=True,
                                                               resample_filter=resample_filter)
                    self.enc[f"{res}x{res}_aux_skip"] = Conv2d(caux, cout, 1, **init)
                if encoder_type == "residual":
                    self.enc[f"{res}x{res}_aux_residual"] = Conv2d(caux, cout, 3, down=True, fused_resample=True,
                                                                   resample_filter=resample_filter, **init)
                    caux = cout
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [blk.out_channels for name, blk in self.enc.items() if "aux" not in name]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                attn = idx == num_blocks and res in attn_resolutions
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=attn, **block)
            if decoder_type == "skip" or level == 0:
                if decoder_type == "skip" and level < len(channel_mult) - 1:
                    self.dec[f"{res}x{res}_aux_up"] = Conv2d(out_channels, out_channels, 0, up=True,
                                                             resample_filter=resample_filter)
                self.dec[f"{res}x{res}_aux_norm"] = GroupNorm(cout, eps=1e-6)
                self.dec[f"{res}x{res}_aux_conv"] = Conv2d(cout, out_channels, 3, **init_zero)
        # the role of each entry, from its name suffix (edm dispatches on the name in forward)
        self._enc_roles = [name.rsplit("_", 1)[-1] if "aux" in name else "main" for name in self.enc]
        self._dec_roles = [name.rsplit("_", 1)[-1] if "aux" in name else "main" for name in self.dec]

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,), labels (B,) class ids or None -> F (B, out_channels, H, W)."""
        class_labels = _one_hot(labels, self.label_dim, x.shape[0], x)
        emb = self.map_noise(c_noise)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos], edm's order
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training)
                                       * math.sqrt(self.label_dim))
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

        skips = []
        aux = x
        for role, blk in zip(self._enc_roles, self.enc.values()):
            if role == "down":
                aux = blk(aux)
            elif role == "skip":
                x = skips[-1] = x + blk(aux)
            elif role == "residual":
                # NCSN++ residual input path: (h + conv(aux))/√2
                x = skips[-1] = aux = (x + blk(aux)) * math.sqrt(0.5)
            else:
                x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
                skips.append(x)

        aux = tmp = None
        for role, blk in zip(self._dec_roles, self.dec.values()):
            if role == "up":
                aux = blk(aux)
            elif role == "norm":
                tmp = blk(x)
            elif role == "conv":
                tmp = blk(F.silu(tmp))
                aux = tmp if aux is None else tmp + aux
            else:
                if x.shape[1] != blk.in_channels:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = blk(x, emb)
        return aux


class DhariwalUNet(nn.Module):
    """ADM U-Net (Dhariwal & Nichol 2021) as edm builds it: positional embedding, scale-and-shift conditioning,
    64-channel attention heads at `attn_resolutions` in encoder and decoder. Module names as edm's."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ) -> None:
        """
        Args:
            img_resolution: input/output height = width; divisible by 2^(len(channel_mult) - 1).
            in_channels: channels of x.
            out_channels: channels of F (2 x in_channels under iDDPMPrecond: mean and variance).
            label_dim: number of classes; 0 = unconditional.
            augment_dim: width of the augmentation labels (9, set by data.augment > 0); 0 = none.
            model_channels: base width; level i has model_channels·channel_mult[i] channels.
            channel_mult: per-level width multipliers; one level per entry.
            channel_mult_emb: width of the embedding vector, in units of model_channels.
            num_blocks: residual blocks per level in the encoder (the decoder has one more).
            attn_resolutions: resolutions whose blocks carry self-attention; the bottleneck always does.
            dropout: dropout probability before the second conv of every block.
            label_dropout: per-sample probability of dropping the label in training (classifier-free guidance).
        """
        super().__init__()
        _check_levels(img_resolution, channel_mult, attn_resolutions)
        self.label_dim = label_dim
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0, init_bias=0)
        block = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout, init=init, init_zero=init_zero)

        self.map_noise = PositionalEmbedding(model_channels)
        self.map_augment = Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal",
                                 init_weight=math.sqrt(label_dim)) if label_dim else None)

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, 3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions, **block)
        skips = [blk.out_channels for blk in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(cin, cout, attention=res in attn_resolutions,
                                                                **block)
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, 3, **init_zero)

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None,
                augment_labels: Tensor | None = None) -> Tensor:
        """x (B, in_channels, H, W), c_noise (B,), labels (B,) class ids or None -> F (B, out_channels, H, W)."""
        class_labels = _one_hot(labels, self.label_dim, x.shape[0], x)
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(_drop_labels(class_labels, self.label_dropout, self.training))
        emb = F.silu(emb)

        skips = []
        for blk in self.enc.values():
            x = blk(x, emb) if isinstance(blk, UNetBlock) else blk(x)
            skips.append(x)
        for blk in self.dec.values():
            if x.shape[1] != blk.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = blk(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


def upgrade_v1_songunet(state: dict[str, Tensor], net: SongUNet, prefix: str = "") -> dict[str, Tensor]:
    """The state_dict of a SongUNet saved by evodiff-pl before the NVlabs layout (checkpoint format 1: ModuleList
    encoder/decoder, `embed.*`, [cos, sin] embedding order, qkv channels grouped q|k|v), in `net`'s layout;
    keys outside `prefix` are passed through. `net` must be built with the checkpoint's kwargs."""
    enc_blocks = [n for n, m in net.enc.items() if isinstance(m, UNetBlock)]
    dec_blocks = [n for n, m in net.dec.items() if isinstance(m, UNetBlock)]
    first_conv, out_norm, out_conv = next(iter(net.enc)), *list(net.dec)[-2:]
    renames = [("embed.map_label.proj.", "map_label."), ("embed.", ""), ("enc_in.", f"enc.{first_conv}."),
               ("out_norm.", f"dec.{out_norm}."), ("out_conv.", f"dec.{out_conv}.")]
    renames += [(f"enc.{i}.", f"enc.{n}.") for i, n in enumerate(enc_blocks)]
    renames += [(f"dec.{i}.", f"dec.{n}.") for i, n in enumerate(dec_blocks)]
    half = net.map_layer0.in_features // 2
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        name = key[len(prefix):]
        for old, new in renames:
            if name.startswith(old):
                name = new + name[len(old):]
                break
        if name == "map_layer0.weight":  # inputs reordered [cos, sin] -> [sin, cos]
            value = torch.cat([value[:, half:], value[:, :half]], dim=1)
        elif name == "map_label.weight":  # its outputs are added to the reordered noise embedding
            value = torch.cat([value[half:], value[:half]], dim=0)
        elif name.endswith(".qkv.weight") or name.endswith(".qkv.bias"):  # channel 3c + j <- j·C + c
            value = value.reshape(3, -1, *value.shape[1:]).transpose(0, 1).reshape(value.shape)
        out[prefix + name] = value
    current = net.state_dict()
    for name in current:  # constants the old layout did not store: resampling filters, the null label's bias
        if prefix + name not in out and (name.endswith("resample_filter") or name == "map_label.bias"):
            out[prefix + name] = torch.zeros_like(current[name]) if name == "map_label.bias" else current[name]
    return out
