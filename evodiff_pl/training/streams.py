"""Every random draw of training batch i is a function of (run seed, i) alone, the same on every rank: σ and noise
of the whole global batch, its augmentation parameters, and the per-sample seeds of its dropout masks (by global
position, `evodiff_pl.networks.dropout`)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor

from evodiff_pl.data.augment import draw_params
from evodiff_pl.networks.dropout import sample_seeds
from evodiff_pl.utils.seeding import derive_seed

AUGMENT_STREAM, DROPOUT_STREAM = 1, 2
"""Seeds of batch i: σ and noise (seed, i), augmentation (seed, i, AUGMENT_STREAM), dropout (seed, i,
DROPOUT_STREAM) split by global position."""


def batch_noise(seed: int, batch_index: int, loss_fn: Any, global_batch: int, sample_shape: Sequence[int],
                dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """(σ, noise) of the whole global batch `batch_index` (σ from `loss_fn.sample_sigma`); rank r uses [r::world]."""
    g = torch.Generator(device=device).manual_seed(derive_seed(seed, batch_index))
    sigma = loss_fn.sample_sigma(global_batch, device=device, generator=g)
    return sigma, torch.randn((global_batch, *sample_shape), generator=g, device=device, dtype=dtype)


def batch_augment(seed: int, batch_index: int, global_batch: int, p: float) -> Tensor:
    """Augmentation parameters (global batch, 8) of batch `batch_index` on the CPU."""
    return draw_params(global_batch, p, torch.Generator().manual_seed(derive_seed(seed, batch_index, AUGMENT_STREAM)))


def dropout_seeds(seed: int, batch_index: int, positions: Tensor) -> Tensor:
    """int64 dropout seeds (`evodiff_pl.networks.dropout.sample_streams`) of the samples at global `positions`
    (int64, on their device) of batch `batch_index`."""
    return sample_seeds(derive_seed(seed, batch_index, DROPOUT_STREAM), positions)
