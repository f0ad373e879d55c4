"""Exponential moving average of the weights, with EDM's half-life schedule counted in images seen.

The EMA is a frozen copy of the preconditioned denoiser owned by the LightningModule (`module.ema`),
updated after every applied optimizer step. Lightning's `WeightAveraging` callback is not used: it
swaps the averaged weights into the trained module, replaces the checkpoint's `state_dict` by the
average and copies the average into the raw model at the end of training, which breaks exact resume
and leaves `sample.py` without the raw weights. Here the checkpoint holds both, as `net.*` and `ema.*`.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def ema_beta(images_seen: int, batch_images: int, halflife_images: float, rampup_ratio: float | None) -> float:
    """Per-step decay for a step of `batch_images` images taken after `images_seen` images."""
    halflife = halflife_images
    if rampup_ratio is not None:
        # EDM training_loop.py: ema_halflife_nimg = min(ema_halflife_kimg * 1000, cur_nimg * ema_rampup_ratio)
        halflife = min(halflife, images_seen * rampup_ratio)
    # EDM training_loop.py: ema_beta = 0.5 ** (batch_size / max(ema_halflife_nimg, 1e-8))
    return 0.5 ** (batch_images / max(halflife, 1e-8))


@torch.no_grad()
def update_ema(ema: nn.Module, net: nn.Module, beta: float, keep: Tensor | None = None) -> None:
    """ema <- beta * ema + (1 - beta) * net for parameters; buffers are copied. `keep`, a 0-dim bool tensor on the
    parameters' device, masks the update without a host-device synchronisation (False: parameters unchanged)."""
    ema_params = [p for p in ema.parameters()]
    net_params = [p.detach() for p in net.parameters()]
    if keep is None:
        torch._foreach_lerp_(ema_params, net_params, 1.0 - beta)
    else:
        weight = keep.to(torch.float64) * (1.0 - beta)
        weights = {dtype: weight.to(dtype) for dtype in {p.dtype for p in ema_params}}
        torch._foreach_lerp_(ema_params, net_params, [weights[p.dtype] for p in ema_params])
    for b_ema, b_net in zip(ema.buffers(), net.buffers()):
        b_ema.copy_(b_net)
