"""Gradient accumulation over rounds of at most `data.batch_gpu` samples per process (edm's `--batch-gpu`).

A process's share of the global batch goes through the network in consecutive rounds; each round back-propagates
its part of the loss sum (EDM's scale: the sum over a sample's elements, divided by the samples of the process), so
the accumulated gradient is the one of the whole share. Under DDP only the last round all-reduces (`no_sync` on the
earlier ones). Every sample keeps the σ, noise, augmentation and dropout masks drawn for its global position, so a run
with `batch_gpu` computes the run without it, up to the order of the gradient sums.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Callable, ContextManager

import torch
from lightning.pytorch.strategies import ParallelStrategy
from torch import Tensor

from evodiff_pl.config.keys import ConfigError
from evodiff_pl.networks.dropout import sample_streams
from evodiff_pl.training.losses import LossOutput


def check_batch_gpu(batch_gpu: int | None, global_batch: int, world_size: int) -> None:
    """ConfigError unless `batch_gpu` (None: no cap) divides the per-process batch global_batch / world_size or is at
    least that batch (one round, as edm's training loop)."""
    if batch_gpu is None:
        return
    local = global_batch // world_size
    if batch_gpu < 1 or (batch_gpu < local and local % batch_gpu):
        raise ConfigError(f"data.batch_gpu={batch_gpu} must divide the per-process batch {local} (data.batch_size="
                         f"{global_batch} over {world_size} processes); e.g. data.batch_gpu="
                         f"{max(d for d in range(1, min(batch_gpu, local) + 1) if local % d == 0)}")


def rounds(n: int, batch_gpu: int | None) -> list[slice]:
    """Consecutive slices of at most `batch_gpu` of `n` samples (one slice without a cap, or for n = 0)."""
    step = batch_gpu if batch_gpu else max(n, 1)
    return [slice(i, i + step) for i in range(0, n, step)] or [slice(0, 0)]


def cat_outputs(parts: list[LossOutput]) -> LossOutput:
    """The per-sample loss terms of consecutive rounds as one batch's."""
    return parts[0] if len(parts) == 1 else LossOutput(*(torch.cat(field) for field in zip(*parts)))


def map_rounds(fn: Callable[[slice], LossOutput], n: int, batch_gpu: int | None) -> LossOutput:
    """`fn` on every round of `n` samples, its per-sample outputs concatenated."""
    return cat_outputs([fn(part) for part in rounds(n, batch_gpu)])


def _no_sync(strategy: Any, sync: bool) -> ContextManager[Any]:
    """No DDP gradient all-reduce in the backward passes of the block unless `sync`."""
    return strategy.block_backward_sync() if not sync and isinstance(strategy, ParallelStrategy) else nullcontext()


def backward_in_rounds(module: Any, x0: Tensor, labels: Tensor | None, sigma: Tensor, noise: Tensor,
                       augment_labels: Tensor | None, dropout_seeds: Tensor, poison: bool = False) -> LossOutput:
    """Forward and backward of `module.net` on this process's batch in rounds of at most `module.batch_gpu`
    samples, each round's dropout masks from its samples' `dropout_seeds` (`sample_streams`); the gradient
    (accumulated in the parameters' .grad) is that of sum(loss) · elements_per_sample / batch, all-reduced once.
    Returns the per-sample loss terms (loss detached; NaN where `poison`, the test hook of train.nan_loss_steps)."""
    n, strategy = x0.shape[0], module.trainer.strategy
    parts = rounds(n, module.batch_gpu)
    outputs = []
    for i, part in enumerate(parts):
        with _no_sync(strategy, sync=i == len(parts) - 1), sample_streams(dropout_seeds[part]):
            out = module.loss_fn(module.net, x0[part], None if labels is None else labels[part], sigma=sigma[part],
                                 noise=noise[part], augment_labels=None if augment_labels is None else augment_labels[part])
            loss = out.loss * math.nan if poison else out.loss
            # EDM's loss scale (training_loop.py: loss.sum() / batch), the batch being this process's share
            module.manual_backward(loss.sum() / n * module.elements_per_sample)
        outputs.append(out._replace(loss=loss.detach()))
    return cat_outputs(outputs)
