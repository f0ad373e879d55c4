"""The EDM training LightningModule, with the per-noise-level loss tracker and the learned entropic schedule.

Same answer on 1 or N processes: every rank draws the sigmas and noise (and, with `augment`, the augmentation
parameters) of the whole global batch from generators seeded by (run seed, batch index) and keeps the slice
`[rank::world_size]`, which matches the samples the rank holds (`evodiff_pl.data.stream.InfiniteSampler` deals global
position k*W + r of a batch to rank r). Dropout and label-dropout masks are a function of (run seed, batch index,
global position) too (`evodiff_pl.networks.dropout`, never torch's generators): nothing else (evaluation, caches,
resumes) shifts them, and neither `data.batch_gpu` nor the process count changes them. As in EDM, the
gradient is that of the per-sample loss summed over its elements, averaged over the global batch (rank means averaged
by DDP; `data.batch_gpu` splits a rank's share into rounds, `evodiff_pl.training.accumulate`); the logged losses
(`train/loss_per_elem`, `val/loss_ema_per_elem`) are per-element means, as EDM's logged `Loss/loss`. Learning rate,
EMA and tracker run on images seen (`evodiff_pl.training.clock`, every consumed batch counted).

The σ-binned tracker behind the learned schedule records, by default (`entropic.source=ema_eval`), the loss of the
network that samples: the EMA copy in eval mode, without grad, on the un-augmented first `entropic.eval_fraction` of
each global batch (global positions, so any number of processes gives the same samples), reusing the step's noise at
noise levels spread evenly in ln σ (`tracker_sigmas`). `train_loss` records the raw network's training loss instead.

Manual optimization: a step whose loss (any rank) or all-reduced gradient is not finite is skipped on every rank alike
(no optimizer, EMA or tracker update) and reported with the step and the batch's sigmas; more than
`max_nonfinite_steps` in a row writes a checkpoint and raises `NonFiniteTrainingError`. With 16-mixed precision,
gradient overflow is the GradScaler's business (it skips the step and lowers the scale); such a step updates neither
EMA nor tracker and is not counted as a failure.

The skip decision reads the all-reduced loss and gradient norm on the host, one device synchronisation per step.
`perf.sync_free_step` decides it on the device instead (fused Adam's `found_inf`, EMA and tracker updates masked by
the same flag, every rank alike) and reads the numbers only at logging steps, where skipped steps are reported and the
`max_nonfinite_steps` limit is checked. Metrics are logged as CPU tensors at logging steps only, so logging never
waits for the device in between."""

from __future__ import annotations

import copy
import math
import time
from pathlib import Path
from typing import Any, Sequence

import lightning as L
import torch
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from evodiff_pl.config.schema import EMAConfig, EntropicConfig, OptimConfig, PerfConfig, TrainConfig
from evodiff_pl.data.augment import augment
from evodiff_pl.training.accumulate import backward_in_rounds, map_rounds
from evodiff_pl.io.checkpointing import CHECKPOINT_KEY, FORMAT, VERSION
from evodiff_pl.networks.precond import EDMPrecond, has_logvar_head
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules.tracker import SigmaBinnedLoss
from evodiff_pl.schedules.head import head_schedule, trusted_range
from evodiff_pl.training.clock import lr_at, lr_edm2, tracker_decay, tracker_sigmas
from evodiff_pl.training.ema import ema_beta, update_ema
from evodiff_pl.training.loggers import cpu_scalars
from evodiff_pl.training.losses import EDMLoss, LossOutput
from evodiff_pl.training.nonfinite import skipped_since_logging, skipped_step, too_many
from evodiff_pl.training.phema import PowerEMA
from evodiff_pl.training.streams import batch_augment, batch_noise, dropout_seeds
from evodiff_pl.training.state import restore_training_state, training_state
from evodiff_pl.utils.dist import world
from evodiff_pl.utils.seeding import derive_seed


class EDMModule(L.LightningModule):
    """EDM training of `net` (an EDMPrecond) with an EMA copy, the σ-binned loss tracker and its entropic schedule.

    Attributes read by the evaluation callback and `sample.py`: `ema`, `entropic_schedule`, `sample_shape`,
    `num_classes`, `sigma_min`, `sigma_max`, `images_seen`.
    """

    def __init__(
        self,
        net: EDMPrecond,
        loss: EDMLoss,
        *,
        sample_shape: Sequence[int],
        num_classes: int,
        global_batch: int,
        seed: int,
        sigma_range: tuple[float, float] = (0.002, 80.0),
        optim: OptimConfig | None = None,
        ema: EMAConfig | None = None,
        entropic: EntropicConfig | None = None,
        train: TrainConfig | None = None,
        perf: PerfConfig | None = None,
        checkpoint_dir: str | Path | None = None,
        snapshot_dir: str | Path | None = None,
        meta: dict[str, Any] | None = None,
        augment: float = 0.0,
        batch_gpu: int | None = None,
    ) -> None:
        """
        Args:
            net: the preconditioned denoiser D(x, σ, labels) being trained.
            loss: the EDM loss (σ distribution and λ(σ)).
            sample_shape: shape of one sample, e.g. (C, H, W) or (D,).
            num_classes: 0 for unconditional training, else labels are fed to the network.
            global_batch: samples per optimizer step over all processes (`data.batch_size`).
            seed: run seed; the σ and noise of batch i come from derive_seed(seed, i).
            sigma_range: (sigma_min, sigma_max), the noise range of the tracker bins and of sampling.
            optim, ema, entropic, train: the config sections of those names (`evodiff_pl.config.schema`; defaults if None):
                Adam and its warm-up, EDM's EMA schedule, the tracker and its schedule, the non-finite-step limit.
            perf: channels-last weights and inputs, torch.compile of `net`, the device-side skip (module docstring).
            checkpoint_dir: where the checkpoint written before a non-finite stop goes.
            snapshot_dir: the run directory; ema.kind=power snapshots go to its `phema/` (none if None).
            meta: stored verbatim in every checkpoint (resolved config, network and data description).
            augment: probability of EDM's geometric augmentation (`data.augment`, `evodiff_pl.data.augment`); 0 = off.
                Its 9-d parameters go to `net` as `augment_labels`.
            batch_gpu: the most samples per network call (`data.batch_gpu`, `evodiff_pl.training.accumulate`).
        """
        super().__init__()
        optim, ema, entropic = optim or OptimConfig(), ema or EMAConfig(), entropic or EntropicConfig()
        train, perf = train or TrainConfig(), perf or PerfConfig()
        self.automatic_optimization = False
        self.channels_last = perf.channels_last and len(sample_shape) == 3
        self.net = net.to(memory_format=torch.channels_last) if self.channels_last else net
        self.power_ema = PowerEMA(self.net, ema.stds) if ema.kind == "power" else None
        self.ema = self.power_ema.profiles[0] if self.power_ema is not None else (
            copy.deepcopy(self.net).requires_grad_(False).eval())
        if perf.compile:
            self.net.compile()  # in place: the state_dict keys stay those of the eager module
        self.sync_free = perf.sync_free_step
        self.loss_fn = loss
        self.sample_shape = tuple(int(s) for s in sample_shape)
        self.elements_per_sample = math.prod(self.sample_shape)
        self.augment = float(augment)
        self.num_classes = int(num_classes)
        self.global_batch, self.batch_gpu = int(global_batch), batch_gpu
        self.seed = int(seed)
        self.sigma_min, self.sigma_max = float(sigma_range[0]), float(sigma_range[1])
        self.adam = {"lr": float(optim.lr), "betas": tuple(float(b) for b in optim.betas), "eps": float(optim.eps)}
        self.lr_rampup_images = optim.lr_rampup_images
        self.lr_ref_images = optim.ref_images if optim.schedule == "edm2" else None
        self.ema_halflife_images = ema.halflife_images
        self.ema_rampup_ratio = ema.rampup_ratio
        self.snapshot_every = ema.snapshot_every_images
        self.snapshot_dir = Path(snapshot_dir) if snapshot_dir is not None else None
        decay = tracker_decay(entropic.ema_decay, self.global_batch, ema.halflife_images)
        self.tracker = SigmaBinnedLoss(self.sigma_min, self.sigma_max, n_bins=entropic.n_bins,
                                       ema_decay=None if decay == 1 else decay, sigma_data=net.sigma_data)
        self.tracker_source = entropic.source
        self.eval_positions = max(1, round(entropic.eval_fraction * self.global_batch))
        """source=ema_eval: global positions 0 .. eval_positions - 1 of every batch are also denoised by the EMA."""
        self.schedule_kind = entropic.kind
        self.schedule_every = entropic.update_every_steps
        self.entropic_schedule: EntropicSchedule | None = None
        self.tuned_grids = None  # TunedGrids of the `tuned` evaluation specs (evaluation.callback)
        self.head_schedule: EntropicSchedule | None = None
        """The rescaled entropic schedule of the EMA's log-variance head (EDM2 networks), rebuilt with the tracker's."""
        self.schedule_version = 0
        self.max_nonfinite_steps = train.max_nonfinite_steps
        self.nan_loss_steps = frozenset(train.nan_loss_steps)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.meta = dict(meta or {})
        self.images_seen = 0
        self.batches_seen = 0
        self.nonfinite_streak = 0
        self._streak = torch.zeros((), dtype=torch.int64)
        """sync_free_step: consecutive skipped steps (on the device)."""
        self._skipped = torch.zeros((), dtype=torch.int64)
        """sync_free_step: skipped steps since the last logging step (on the device)."""
        self._last_log: tuple[float, int] | None = None

    def train(self, mode: bool = True) -> "EDMModule":
        """Lightning toggles train/eval on the whole module; the EMA copy always stays in eval mode."""
        super().train(mode)
        (self.power_ema if self.power_ema is not None else self.ema).eval()  # self.ema is a power-EMA profile there
        return self

    def on_train_start(self) -> None:
        self._last_log = (time.perf_counter(), self.images_seen)  # img/s of the first logging step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), **self.adam, fused=True if self.sync_free else None)

    def draw_noise(self, batch_index: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(σ, noise) of the whole global batch `batch_index` (`evodiff_pl.training.streams`)."""
        return batch_noise(self.seed, batch_index, self.loss_fn, self.global_batch, self.sample_shape, dtype, self.device)

    def _all_reduce_sum(self, t: Tensor) -> Tensor:
        return self.trainer.strategy.reduce(t, reduce_op="sum")

    def _grad_scaler(self) -> torch.amp.GradScaler | None:
        """The GradScaler of 16-mixed precision, None otherwise."""
        plugin = self.trainer.precision_plugin
        return plugin.scaler if isinstance(plugin, MixedPrecision) else None

    def _reduce_step(self, per_sample: Tensor) -> Tensor:
        """(loss sum, non-finite per-sample losses, gradient norm) over all ranks, float64 on the device: the same
        numbers on every rank."""
        grads = [p.grad for p in self.net.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm(grads, error_if_nonfinite=False)
        local = torch.stack([per_sample.detach().sum().double(), (~per_sample.detach().isfinite()).sum().double()])
        return torch.cat([self._all_reduce_sum(local), grad_norm.double().reshape(1)])

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x0, labels = batch
        rank, world_size = world()
        if x0.shape[0] * world_size != self.global_batch:
            raise ValueError(f"got {x0.shape[0]} samples per process x {world_size} processes, expected the global "
                             f"batch {self.global_batch}: train with the datamodule built by evodiff_pl.training.run")
        clean, augment_labels = x0, None  # the EMA pass of entropic.source=ema_eval sees the un-augmented images
        if self.augment:
            params = batch_augment(self.seed, self.batches_seen, self.global_batch, self.augment)
            x0, augment_labels = augment(x0, params[rank::world_size], pad_params=params)
        if self.channels_last:
            x0 = x0.contiguous(memory_format=torch.channels_last)
        batch_sigmas, batch_noise = self.draw_noise(self.batches_seen, x0.dtype)
        sigma, noise = batch_sigmas[rank::world_size], batch_noise[rank::world_size]
        tracked = self._ema_eval_loss(clean, labels, noise) if self.tracker_source == "ema_eval" else None
        seeds = dropout_seeds(self.seed, self.batches_seen, torch.arange(rank, self.global_batch, world_size,
                                                                         device=self.device))
        out = backward_in_rounds(self, x0, labels if self.num_classes else None, sigma, noise, augment_labels, seeds,
                                 poison=self.batches_seen in self.nan_loss_steps)
        stats = self._reduce_step(out.loss)
        lr = self.learning_rate()
        if self.sync_free:
            self._device_step(stats, lr, out if tracked is None else tracked)
        else:
            self._host_step(stats, lr, out if tracked is None else tracked, batch_sigmas)
        self._snapshot_power_ema()
        final = self.global_step >= self.trainer.max_steps
        if final or self.batches_seen % self.schedule_every == 0:
            self.rebuild_schedule()
        if final:
            self.trainer.should_stop = True  # Lightning then also validates (runs the evaluation callback) now

    @torch.no_grad()
    def _ema_eval_loss(self, x0: Tensor, labels: Tensor, noise: Tensor) -> LossOutput:
        """entropic.source=ema_eval: the loss of the EMA network (eval mode, no dropout) on this rank's share of the
        clean batch's first `eval_positions` global positions, with the step's noise at `tracker_sigmas`."""
        rank, world_size = world()
        sigma = tracker_sigmas(self.batches_seen, self.eval_positions, self.sigma_min, self.sigma_max, self.device)
        sigma = sigma[rank::world_size].to(noise.dtype)  # local j = position jW + r
        n = sigma.shape[0]
        if n == 0:
            return LossOutput(sigma, sigma, sigma, sigma)
        return map_rounds(lambda part: self.loss_fn(self.ema, x0[:n][part], labels[:n][part] if self.num_classes else None,
                                                    sigma=sigma[part], noise=noise[:n][part]), n, self.batch_gpu)

    def _logging_step(self) -> bool:
        """Whether Lightning sends this batch's metrics to the logger (its log_every_n_steps rule over all batches)."""
        return self.batches_seen % self.trainer.log_every_n_steps == 0 or self.global_step >= self.trainer.max_steps

    def _host_step(self, stats: Tensor, lr: float, tracked: LossOutput, batch_sigmas: Tensor) -> None:
        """The default step: the skip decision on the host (one synchronisation)."""
        loss_sum, n_bad, grad_norm = stats.tolist()
        scaler = self._grad_scaler()
        skip = n_bad > 0 or not math.isfinite(loss_sum) or (scaler is None and not math.isfinite(grad_norm))
        scale = scaler.get_scale() if scaler is not None else 1.0
        if self._optimizer_step(lr, skip) and (scaler is None or scaler.get_scale() >= scale):
            self._update_averages(tracked)
        self.images_seen += self.global_batch
        self.batches_seen += 1
        if skip:
            self._skip(batch_sigmas, n_bad, loss_sum, grad_norm)
        elif self._logging_step():
            self._log_step(loss_sum / self.global_batch, lr, grad_norm / scale)

    def _device_step(self, stats: Tensor, lr: float, tracked: LossOutput) -> None:
        """perf.sync_free_step: every update masked by an on-device flag; the host reads it at logging steps only."""
        ok = (stats[1] == 0) & stats[0].isfinite() & stats[2].isfinite()
        opt = self.optimizers()
        for group in opt.param_groups:
            group["lr"] = lr
        opt.optimizer.found_inf = (~ok).float()  # fused Adam leaves weights, moments and step count alone if != 0
        opt.step()
        opt.zero_grad(set_to_none=True)
        self._update_ema(keep=ok)
        self.tracker.update(tracked.sigma, tracked.mse, tracked.weight, keep=ok)
        self._streak = self._streak.to(ok.device).add(1).mul(~ok)
        self._skipped = self._skipped.to(ok.device).add(~ok)
        self.images_seen += self.global_batch
        self.batches_seen += 1
        if not self._logging_step():
            return
        loss_sum, _, grad_norm, streak, skipped = torch.cat([stats, torch.stack([self._streak, self._skipped])]).tolist()
        self._skipped.zero_()
        self.nonfinite_streak = int(streak)
        if skipped:
            rank_zero_warn(skipped_since_logging(self.global_step, self.batches_seen - 1, int(skipped), int(streak)))
            self._stop_if_too_many()
        if not streak:
            self._log_step(loss_sum / self.global_batch, lr, grad_norm)

    def _optimizer_step(self, lr: float, skip: bool) -> bool:
        """Adam at learning rate `lr` unless `skip`; clears the gradients either way. Returns whether it stepped."""
        opt = self.optimizers()
        if not skip:
            for group in opt.param_groups:
                group["lr"] = lr
            opt.step()
        opt.zero_grad(set_to_none=True)
        return not skip

    def _update_averages(self, tracked: LossOutput) -> None:
        """After an applied step: the EMA weights and the per-σ loss tracker (with the per-sample losses of the
        tracker's source: the EMA pass or the training loss)."""
        self._update_ema()
        self.tracker.update(tracked.sigma, tracked.mse, tracked.weight)
        self.nonfinite_streak = 0

    def learning_rate(self) -> float:
        """The learning rate of the next step (optim.schedule), a function of the images seen."""
        if self.lr_ref_images is None:
            return lr_at(self.images_seen, self.adam["lr"], self.lr_rampup_images)
        return lr_edm2(self.images_seen, self.adam["lr"], self.lr_rampup_images, self.lr_ref_images)

    def _update_ema(self, keep: Tensor | None = None) -> None:
        """One EMA step for the batch being applied (before `images_seen` counts it); `keep` as `update_ema`."""
        if self.power_ema is not None:
            self.power_ema.update(self.net, self.images_seen + self.global_batch, self.global_batch, keep=keep)
            return
        beta = ema_beta(self.images_seen, self.global_batch, self.ema_halflife_images, self.ema_rampup_ratio)
        update_ema(self.ema, self.net, beta, keep=keep)

    def _snapshot_power_ema(self) -> None:
        """Write every power-EMA profile to RUN/phema when this batch took the images seen past a multiple of
        ema.snapshot_every_images (rank 0; the profiles are the same on every rank)."""
        if self.power_ema is None or self.snapshot_dir is None or not self.trainer.is_global_zero:
            return
        meta = {"format": FORMAT, "version": VERSION, **self.meta, "images_seen": self.images_seen,
                "global_step": self.global_step,
                "schedule": self.entropic_schedule.to_dict() if self.entropic_schedule is not None else None}
        self.power_ema.snapshot(self.snapshot_dir, self.images_seen, self.global_batch, self.snapshot_every, meta)

    def _log_step(self, loss: float, lr: float, grad_norm: float) -> None:
        """Log the step's numbers (at logging steps), as CPU tensors so that Lightning never reads the device."""
        now = time.perf_counter()
        shown = {"train/loss_per_elem": loss}
        if self._last_log is not None:
            shown["train/img_per_s"] = (self.images_seen - self._last_log[1]) / max(now - self._last_log[0], 1e-9)
        self._last_log = (now, self.images_seen)
        metrics = {"train/lr": lr, "train/grad_norm": grad_norm, "train/images_seen": float(self.images_seen),
                   "train/kimg": self.images_seen / 1000}
        self.log_dict(cpu_scalars(metrics), on_step=True, on_epoch=False, rank_zero_only=True)
        self.log_dict(cpu_scalars(shown), prog_bar=True, on_step=True, on_epoch=False, rank_zero_only=True)

    def _skip(self, batch_sigmas: Tensor, n_bad: float, loss_sum: float, grad_norm: float) -> None:
        self.nonfinite_streak += 1
        rank_zero_warn(skipped_step(self.global_step, self.batches_seen - 1, n_bad, loss_sum, grad_norm,
                                    self.nonfinite_streak, batch_sigmas))
        self._stop_if_too_many()

    def _stop_if_too_many(self) -> None:
        """Checkpoint and raise NonFiniteTrainingError when the streak of skipped steps exceeds the limit."""
        if self.nonfinite_streak <= self.max_nonfinite_steps:
            return
        finite = all(bool(torch.isfinite(p).all()) for p in self.net.parameters())
        path = None
        if finite and self.checkpoint_dir is not None:
            path = self.checkpoint_dir / f"nonfinite-step{self.global_step}.ckpt"
            self.trainer.save_checkpoint(path, weights_only=False)
        raise too_many(self.nonfinite_streak, self.max_nonfinite_steps, self.global_step, self.batches_seen - 1,
                       finite, path)

    def rebuild_schedule(self) -> None:
        """Sync the tracker over ranks and rebuild the entropic schedule from it (call on every rank); also the
        schedule of the EMA's log-variance head, if it has one."""
        self.tracker.sync()
        if has_logvar_head(self.ema):
            trusted = trusted_range(self.loss_fn.P_mean, self.loss_fn.P_std, self.sigma_min, self.sigma_max)
            self.head_schedule = head_schedule(self.ema, kind=self.schedule_kind, sigma_min=self.sigma_min,
                                               sigma_max=self.sigma_max, trusted=trusted,
                                               dim=math.prod(self.sample_shape),
                                               source={"images_seen": self.images_seen, "step": self.global_step})
        try:
            self.entropic_schedule = EntropicSchedule.from_loss_stats(
                self.tracker, kind=self.schedule_kind, dim=math.prod(self.sample_shape),
                source={"images_seen": self.images_seen, "step": self.global_step, "loss_of": self.tracker_source},
            )
        except ValueError as err:
            rank_zero_info(f"entropic schedule not rebuilt at batch {self.batches_seen}: {err}")
            return
        self.schedule_version += 1

    @torch.no_grad()
    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        """EMA loss on a fixed batch with fixed noise (a cheap, smooth progress signal)."""
        x0, labels = batch
        g = torch.Generator(device=self.device).manual_seed(derive_seed(self.seed, 2**62 + batch_idx))
        sigma = self.loss_fn.sample_sigma(x0.shape[0], device=self.device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
        out = self.loss_fn(self.ema, x0, labels if self.num_classes else None, sigma=sigma, noise=noise)
        self.log("val/loss_ema_per_elem", out.loss.mean(), on_step=False, on_epoch=True, sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Add the training state that Lightning does not keep (called on every rank, written by rank 0)."""
        checkpoint[CHECKPOINT_KEY] = training_state(self)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        restore_training_state(self, checkpoint, checkpoint[CHECKPOINT_KEY])
