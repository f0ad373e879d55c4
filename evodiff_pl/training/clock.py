"""Everything training counts in images seen (so it survives a change of batch size or process count): the
learning rate, the tracker's decay and the noise levels of the tracker's EMA pass."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from evodiff_pl.training.ema import ema_beta


def lr_at(images_seen: int, lr: float, rampup_images: int) -> float:
    """Learning rate after `images_seen` images."""
    # EDM training_loop.py: lr * min(cur_nimg / max(lr_rampup_kimg * 1000, 1e-8), 1)
    return lr * min(images_seen / max(rampup_images, 1e-8), 1.0)


def lr_edm2(images_seen: int, lr: float, rampup_images: int, ref_images: int) -> float:
    """EDM2's learning rate: the warm-up of `lr_at`, divided by √(images_seen / ref_images) past ref_images."""
    # EDM2 training_loop.py learning_rate_schedule: ref_lr / sqrt(max(cur_nimg / (ref_batches * batch_size), 1))
    decay = math.sqrt(max(images_seen / ref_images, 1.0)) if ref_images > 0 else 1.0
    return lr_at(images_seen, lr, rampup_images) / decay


def tracker_decay(ema_decay: float | None, global_batch: int, ema_halflife_images: float) -> float:
    """The tracker's per-step decay: `ema_decay`, or if None the decay whose half-life is that of the EMA weights, so
    that the loss curve averages the same recent stretch of training as the sampling network does."""
    return ema_beta(0, global_batch, ema_halflife_images, None) if ema_decay is None else float(ema_decay)


def tracker_sigmas(batch_index: int, n: int, sigma_min: float, sigma_max: float,
                   device: torch.device | str = "cpu") -> Tensor:
    """σ of the EMA pass at global positions 0 .. n - 1 of batch `batch_index` (float64): one per equal stratum of
    ln σ over [sigma_min, sigma_max], all shifted by frac(batch_index·φ), φ = (√5 − 1)/2."""
    # u_p = (p + frac(b φ)) / P, ln σ_p = ln σ_min + u_p (ln σ_max − ln σ_min)  (docs/method.md §3.3)
    shift = math.fmod(batch_index * (math.sqrt(5.0) - 1.0) / 2.0, 1.0)
    u = (torch.arange(n, dtype=torch.float64, device=device) + shift) / n
    lo, hi = math.log(sigma_min), math.log(sigma_max)
    return (lo + u * (hi - lo)).exp()
