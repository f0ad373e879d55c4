"""The ADM U-Net of EDM (`DhariwalUNet`, Dhariwal & Nichol 2021; Karras et al. 2022), computing what NVlabs
edm's `training/networks.py` computes, with the same parameter and buffer names, so a state_dict of edm's network
loads as is (and ours into theirs).

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

from evodiff_pl.networks.layers import PositionalEmbedding
from evodiff_pl.networks.unet_blocks import (
    Conv2d, GroupNorm, Linear, UNetBlock, check_levels, drop_labels, one_hot_labels,
)


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
        check_levels(img_resolution, channel_mult, attn_resolutions)
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
        class_labels = one_hot_labels(labels, self.label_dim, x.shape[0], x)
        emb = self.map_noise(c_noise)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = self.map_layer1(F.silu(self.map_layer0(emb)))
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training))
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
