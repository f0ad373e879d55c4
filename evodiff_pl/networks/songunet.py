"""EDM's DDPM++/NCSN++ U-Net (`SongUNet`, Song et al. 2021; Karras et al. 2022), computing what NVlabs edm's
`training/networks.py` computes, with the same parameter and buffer names, so a state_dict of edm's network loads
as is (and ours into theirs); and the upgrade of this package's pre-NVlabs-layout checkpoints.

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
from evodiff_pl.networks.unet_blocks import (
    Conv2d, GroupNorm, Linear, UNetBlock, check_levels, drop_labels, one_hot_labels,
)


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
            augment_dim: width of the augmentation labels (`evodiff_pl.data.augment`: 9, set by data.augment > 0); 0 = none.
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
        check_levels(img_resolution, channel_mult, attn_resolutions)
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
        class_labels = one_hot_labels(labels, self.label_dim, x.shape[0], x)
        emb = self.map_noise(c_noise)
        emb = emb.reshape(emb.shape[0], 2, -1).flip(1).reshape(emb.shape)  # [sin, cos], edm's order
        if self.map_label is not None:
            emb = emb + self.map_label(drop_labels(class_labels, self.label_dropout, self.training)
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
