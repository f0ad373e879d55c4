"""The per-noise-level loss tracker behind the learned schedule: running statistics of q = λ(σ)·MSE in fixed
ln σ bins, accumulated while the model trains, the same on 1 or N processes (docs/method.md §3.3)."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from evodiff_pl.utils.dist import all_gather, all_reduce, world

_TRACKER_FORMAT = "evodiff-pl/sigma-binned-loss"
_VERSION = 2
"""Version 2 keeps every rank's pending sums (rows of `pending_sum`, `pending_count`); version 1 had one row."""


class SigmaBinnedLoss:
    """Running per-level statistics of the EDM training loss, q = lambda(sigma) * MSE, in fixed ln-sigma bins.

    `n_bins` equal bins of ln sigma cover [sigma_min, sigma_max]; samples outside that range (and NaN sigmas)
    are dropped, so every bin's mean is the mean over exactly its own interval. A non-finite loss poisons its
    bin until `reset()`; `EntropicSchedule.from_loss_stats` refuses such a curve.

    `update` is the hot path: tensor ops on the device of its inputs, float64 sums, no host sync. It adds to a
    rank-local pending accumulator; `sync()` all-reduces the pending sums and counts over the default process
    group (when one is initialised) and folds them into the statistics, so every rank holds the same numbers.
    With `ema_decay = d` both sums and counts decay by d per `update` call (= per training step), pending
    included: the statistics are the same whether a global batch is fed to one process or split over ranks.
    Readers (`steps`, `sums`, `counts`, `mean_q`, `populated`) return the last synced statistics; without a process
    group they include the pending data, computed as `sync()` would fold it but without folding it. Only `sync()`
    folds, so the float64 sums depend on its call points alone: `state_dict()` keeps every rank's pending sums apart,
    and a checkpoint written at any step resumes to the same bits. Call `sync()` on every rank, e.g. every N steps.
    """

    def __init__(
        self,
        sigma_min: float = 0.002,
        sigma_max: float = 80.0,
        n_bins: int = 64,
        ema_decay: float | None = None,
        sigma_data: float = 0.5,
    ) -> None:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got {sigma_min}, {sigma_max}")
        if not isinstance(n_bins, int) or n_bins < 2:
            raise ValueError(f"n_bins must be an integer >= 2, got {n_bins!r}")
        if ema_decay is not None and not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1) or None, got {ema_decay}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)
        self.n_bins, self.ema_decay, self.sigma_data = n_bins, ema_decay, float(sigma_data)
        self._lo, self._hi = math.log(self.sigma_min), math.log(self.sigma_max)
        self._width = (self._hi - self._lo) / n_bins
        self._sum, self._count, self._pending_sum, self._pending_count = (
            torch.zeros(n_bins, dtype=torch.float64) for _ in range(4)
        )
        self._steps = 0
        self._pending_steps = 0

    @property
    def steps(self) -> int:
        """Number of `update` calls in the statistics the readers return (per rank; equal on every rank)."""
        return self._steps + (self._pending_steps if world()[1] == 1 else 0)

    @property
    def pending_steps(self) -> int:
        """Number of `update` calls since the last `sync()` on this rank."""
        return self._pending_steps

    def _buffers(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        return self._sum, self._count, self._pending_sum, self._pending_count

    def _to(self, device: torch.device) -> None:
        if self._sum.device != device:
            self._sum, self._count, self._pending_sum, self._pending_count = (b.to(device) for b in self._buffers())

    @torch.no_grad()
    def update(self, sigma: Tensor, mse: Tensor, weight: Tensor, keep: Tensor | None = None) -> None:
        """Add one training step: per-sample sigma (B,), x0-space MSE (B,) (mean over elements) and lambda (B,).

        `keep`, a 0-dim bool tensor, masks the whole step on the device (False: the sums and their decay stay as
        they were, without a host-device synchronisation); the step is counted either way."""
        sigma, mse, weight = (t.detach().reshape(-1).to(torch.float64) for t in (sigma, mse, weight))
        if not sigma.shape == mse.shape == weight.shape:
            raise ValueError(f"sigma, mse and weight must have one value per sample, got shapes "
                             f"{tuple(sigma.shape)}, {tuple(mse.shape)}, {tuple(weight.shape)}")
        self._to(sigma.device)
        log_sigma = sigma.log()
        valid = (log_sigma >= self._lo) & (log_sigma <= self._hi)
        if keep is not None:
            valid = valid & keep
        pos = torch.where(valid, (log_sigma - self._lo) / self._width, torch.zeros_like(log_sigma))
        idx = pos.floor().clamp(0, self.n_bins - 1).long()
        # q = lambda(sigma) * MSE, the EDM loss per sample (docs/method.md §3)
        q = torch.where(valid, weight * mse, torch.zeros_like(mse))
        if self.ema_decay is not None:
            decay = self.ema_decay if keep is None else 1.0 + keep.to(torch.float64) * (self.ema_decay - 1.0)  # exact
            self._pending_sum.mul_(decay)
            self._pending_count.mul_(decay)
        self._pending_sum.index_add_(0, idx, q)
        self._pending_count.index_add_(0, idx, valid.to(torch.float64))
        self._pending_steps += 1

    def _check_steps(self) -> None:
        """RuntimeError unless every rank made as many `update` calls since the last sync (call on every rank)."""
        steps = self._pending_steps
        bounds = all_reduce(torch.tensor([steps, -steps], dtype=torch.float64), dist.ReduceOp.MAX).tolist()
        if bounds[0] != -bounds[1]:
            raise RuntimeError(f"SigmaBinnedLoss.update was called {-bounds[1]:.0f} to {bounds[0]:.0f} times "
                               "per rank since the last sync; every rank must update once per step")

    def _folded(self, pending_sum: Tensor, pending_count: Tensor) -> tuple[Tensor, Tensor]:
        """The statistics with all ranks' pending sums (`pending_*`) folded in, as new tensors."""
        decay = 1.0 if self.ema_decay is None else self.ema_decay**self._pending_steps
        return self._sum * decay + pending_sum, self._count * decay + pending_count

    @torch.no_grad()
    def sync(self) -> None:
        """All-reduce (SUM) the pending statistics over ranks and fold them in; call on every rank."""
        pending = torch.cat([self._pending_sum, self._pending_count])
        if world()[1] > 1:
            self._check_steps()
            pending = all_reduce(pending, dist.ReduceOp.SUM)
        self._sum, self._count = self._folded(pending[: self.n_bins], pending[self.n_bins :])
        self._steps += self._pending_steps
        self._pending_sum.zero_()
        self._pending_count.zero_()
        self._pending_steps = 0

    def _synced(self) -> tuple[Tensor, Tensor]:
        if world()[1] == 1 and self._pending_steps:
            return tuple(t.cpu() for t in self._folded(self._pending_sum, self._pending_count))
        return self._sum.cpu(), self._count.cpu()

    def bin_centers(self) -> Tensor:
        """sigma at the centre (in ln sigma) of every bin, float64 (n_bins,)."""
        return torch.exp(self._lo + self._width * (torch.arange(self.n_bins, dtype=torch.float64) + 0.5))

    def counts(self) -> Tensor:
        """Samples per bin (decayed sums of sample counts with EMA), float64 (n_bins,) on the CPU."""
        return self._synced()[1].clone()

    def sums(self) -> Tensor:
        """Sum of q = lambda * MSE per bin (decayed with EMA), float64 (n_bins,) on the CPU."""
        return self._synced()[0].clone()

    def mean_q(self) -> Tensor:
        """Mean q = lambda * MSE per bin, NaN where a bin is empty, float64 (n_bins,) on the CPU."""
        total, count = self._synced()
        return torch.where(count > 0, total / count, torch.full_like(total, math.nan))

    def populated(self, min_count: float = 1.0) -> Tensor:
        """Bool mask of the bins holding at least `min_count` (effective, with EMA) samples."""
        return self._synced()[1] >= min_count

    def reset(self) -> None:
        """Forget all statistics, pending ones included."""
        for b in self._buffers():
            b.zero_()
        self._steps = 0
        self._pending_steps = 0

    def _config(self) -> dict[str, Any]:
        return {"sigma_min": self.sigma_min, "sigma_max": self.sigma_max, "n_bins": self.n_bins,
                "ema_decay": self.ema_decay, "sigma_data": self.sigma_data}

    def _gather_pending(self) -> Tensor:
        """Every rank's pending (sum, count), (world, 2, n_bins) on the CPU, unfolded (call on every rank)."""
        pending = torch.stack([self._pending_sum, self._pending_count])
        if world()[1] == 1:
            return pending.cpu().unsqueeze(0)
        self._check_steps()
        return all_gather(pending).cpu()

    def state_dict(self) -> dict[str, Any]:
        """Plain tensors (CPU) and config, without folding: the synced `sum` and `count` and every rank's pending
        sums as rows of `pending_sum` and `pending_count` (world, n_bins). With several ranks, call on every rank."""
        pending = self._gather_pending()
        return {"format": _TRACKER_FORMAT, "version": _VERSION, **self._config(), "sum": self._sum.cpu().clone(),
                "count": self._count.cpu().clone(), "pending_sum": pending[:, 0], "pending_count": pending[:, 1],
                "steps": self._steps, "pending_steps": self._pending_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore `state_dict()` output exactly, each rank its own pending row when the number of processes is the
        same; otherwise rank 0 takes the sum of the rows. The binning config must match this tracker's."""
        if not isinstance(state, dict) or state.get("format") != _TRACKER_FORMAT:
            raise ValueError("not a SigmaBinnedLoss state dict (missing format tag)")
        if state.get("version") not in (1, _VERSION):
            raise ValueError(f"unsupported SigmaBinnedLoss state version {state.get('version')!r}")
        saved = {k: state.get(k) for k in self._config()}
        if saved != self._config():
            raise ValueError(f"SigmaBinnedLoss config mismatch: checkpoint {saved}, tracker {self._config()}")
        dev = self._sum.device
        names = ("sum", "count", "pending_sum", "pending_count")
        tensors = [torch.as_tensor(state[k], dtype=torch.float64) for k in names]
        if any(t.shape[-1:] != (self.n_bins,) for t in tensors) or tensors[0].ndim != 1 or tensors[1].ndim != 1:
            raise ValueError(f"SigmaBinnedLoss state tensors must have shape ({self.n_bins},)")
        rank, world_size = world()
        rows = [t.reshape(-1, self.n_bins) for t in tensors[2:]]
        if rows[0].shape[0] == world_size:
            pending = [r[rank] for r in rows]
        else:
            pending = [r.sum(0) if rank == 0 else torch.zeros_like(r[0]) for r in rows]
        self._sum, self._count, self._pending_sum, self._pending_count = (
            t.to(dev).clone() for t in (*tensors[:2], *pending))
        self._steps, self._pending_steps = int(state["steps"]), int(state["pending_steps"])
