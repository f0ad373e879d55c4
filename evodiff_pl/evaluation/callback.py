"""Sample quality during training: a Lightning callback scoring the EMA denoiser under several solver settings."""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.loggers import WandbLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from evodiff_pl.evaluation.settings import EvaluationSettings
from evodiff_pl.sampling.generate import EvalSpec, generate, rank_indices
from evodiff_pl.sampling.guidance import Denoiser, guide_of, guided
from evodiff_pl.sampling.grid_tuning import learned_start, tune_grids, tuning_noise
from evodiff_pl.schedules.tuned import KIND as TUNED
from evodiff_pl.utils.images import save_grid, to_uint8
from evodiff_pl.evaluation.metrics import FrechetScore
from evodiff_pl.sampling.plan import with_kind
from evodiff_pl.schedules.grids import from_head, learned_kind
from evodiff_pl.utils.stop import stoppable

log = logging.getLogger(__name__)


class SampleQualityCallback(EvaluationSettings, L.Callback):
    """Fréchet distance of EMA samples to the training data for each `EvalSpec`, every few validations.

    Every rank generates its strided share of the `num_samples` indices (sample j uses seed + j, so the
    score does not depend on the number of processes), the score is reduced once over ranks and logged
    as `val/<score name>/<spec name>`, e.g. `val/fd_pixels_2k/evodiff_rescaled_entropic_nfe10`. Rank 0
    saves a fixed-seed grid per spec to `<out_dir>/grids/<spec name>_<images seen>.png` (images only)
    and sends it to W&B when a WandbLogger is attached. A spec whose learned schedule does not exist
    yet is skipped with an info line; a failing spec is skipped with a warning and never stops training.

    A stop signal (`evodiff_pl.utils.stop`) is acted on, on every rank together, between the batches of the reference
    statistics in `setup` (nothing is cached: the rerun computes them anew) and between generated batches: the
    evaluation is abandoned and stays `pending` in the callback's checkpointed state, so the rerun redoes it first
    (before its first training step, or in the final validation).

    The LightningModule must expose `ema` (D(x, sigma[, labels])), `entropic_schedule` (or None), `head_schedule`
    (the schedule of an EDM2 head, for the head_* schedules; or None),
    `sample_shape`, `num_classes`, `sigma_min`, `sigma_max` and `images_seen`; the datamodule
    `shape`, `stats_key()` and `real_images(max_n)`. The reference statistics are prepared in `setup`. Its
    options and their checks are `EvaluationSettings`' (read by train.py's --help without Lightning).
    """

    @property
    def state_key(self) -> str:
        return self._generate_state_key(feature=self.feature, num_samples=self.num_samples,
                                        specs=tuple(s.name for s in self.specs))

    def state_dict(self) -> dict[str, int]:
        return {"evals": self._evals, "last_bucket": self._last_bucket, "pending": int(self.pending)}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self._evals = state_dict["evals"]
        self._last_bucket = state_dict["last_bucket"]
        self.pending = bool(state_dict.get("pending", 0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Build the score and load (or compute and cache, on rank 0) the reference statistics."""
        if self.score is not None or stage not in ("fit", "validate"):
            return
        self._check_guidance(pl_module)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "real_images"):
            raise ValueError("SampleQualityCallback needs a datamodule with shape, stats_key() and real_images()")
        self.score = FrechetScore(
            self._extractor if self._extractor is not None else self.feature,
            num_samples=self.num_samples, shape=tuple(dm.shape), stats_dir=self.stats_dir, num_real=self.num_real,
        ).to(trainer.strategy.root_device)
        start = time.perf_counter()
        path = self.score.prepare_real(dm, rank=trainer.global_rank)
        rank_zero_info(f"{self.score.name}: reference statistics {path} ({time.perf_counter() - start:.1f} s)")

    def _check_guidance(self, pl_module: L.LightningModule) -> None:
        """ValueError for a spec's class or guidance that the network (and gnet) cannot have."""
        classes = pl_module.num_classes
        if self._gnet is not None:
            self._gnet.denoiser.to(pl_module.device)
            if self._gnet.meta["sample_shape"] != list(pl_module.sample_shape):
                raise ValueError(f"evaluation.gnet makes samples of shape {self._gnet.meta['sample_shape']}, the "
                                 f"network {list(pl_module.sample_shape)}")
        for spec in self.specs:
            if spec.class_label is not None and spec.class_label >= classes:
                raise ValueError(f"spec {spec.name}: class {spec.class_label} is not a class of the network "
                                 f"({classes} classes)")
            self._denoiser(pl_module, spec)

    def _denoiser(self, pl_module: L.LightningModule, spec: EvalSpec) -> Denoiser:
        """The EMA denoiser, guided as `spec` says."""
        return guided(pl_module.ema, spec.guidance, pl_module.num_classes, *guide_of(self._gnet))

    def _due(self, pl_module: L.LightningModule) -> bool:
        if self.pending:  # an abandoned evaluation, already counted
            return True
        self._evals += 1
        if self.every_n_images is not None:
            bucket = int(pl_module.images_seen) // self.every_n_images
            due, self._last_bucket = bucket > self._last_bucket, max(bucket, self._last_bucket)
            return due
        return self._evals % (self.every_n_evals or 1) == 0

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        final = 0 < trainer.max_steps <= trainer.global_step  # the end of training always scores, whatever the rhythm
        if not trainer.sanity_checking and (self._due(pl_module) or final):
            self._evaluate_specs(trainer, pl_module, redo=False)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: object) -> None:
        """A resumed run redoes the evaluation that a stop signal abandoned, before its first training step."""
        if self.pending:
            self._evaluate_specs(trainer, pl_module, redo=True)

    def _evaluate_specs(self, trainer: L.Trainer, pl_module: L.LightningModule, redo: bool) -> None:
        """Score and log every spec (and save its grid); `pending` until the last one is done. A `redo` outside
        validation goes to the loggers directly, at the step Lightning logs the evaluation after that step under."""
        self.pending = True
        self._tune(pl_module)
        for spec in self.specs:
            start = time.perf_counter()
            sigmas = self._sigmas(pl_module, spec)
            value = None if sigmas is None else self.evaluate(trainer, pl_module, spec, sigmas)
            if value is None:
                continue
            name = f"val/{self.score.name}/{spec.name}"
            if not redo:
                pl_module.log(name, value, sync_dist=False, rank_zero_only=False)
            elif trainer.is_global_zero:
                for logger in trainer.loggers:
                    logger.log_metrics({name: value}, step=max(trainer.global_step - 1, 0))
            rank_zero_info(f"val/{self.score.name}/{spec.name} = {value:.6g} ({time.perf_counter() - start:.1f} s)")
            if trainer.is_global_zero and self.grid_size and len(pl_module.sample_shape) == 3:
                self._save_grid(trainer, pl_module, spec, sigmas)
        self.pending = False

    def _tune(self, pl_module: L.LightningModule) -> None:
        """Tune the grid of every spec on `tuned` from the current EMA network (every rank; same grids on all)."""
        wanted = [(s.solver, s.nfe) for s in self.specs if s.schedule == TUNED]
        learned = pl_module.entropic_schedule
        if not wanted or learned is None:
            return
        start_time = time.perf_counter()
        x_T, labels = tuning_noise(self.tune_samples, tuple(pl_module.sample_shape), pl_module.sigma_max,
                                   pl_module.num_classes, pl_module.device)
        start = learned_start(learned, pl_module.sigma_min, pl_module.sigma_max)
        data = self.score.moments() if self.tune["objective"] == "fd_data" else None  # every rank: a collective
        try:
            pl_module.tuned_grids = tune_grids(
                wanted, pl_module.ema, x_T, start, labels=labels, previous=getattr(pl_module, "tuned_grids", None),
                data=data, source={"images_seen": int(pl_module.images_seen)}, **self.tune)
        except ValueError as err:  # same inputs on every rank: all ranks keep their previous grids together
            rank_zero_warn(f"tuning the grids of the tuned specs failed, keeping the previous ones: {err}")
            return
        rank_zero_info(f"tuned grids of {', '.join(f'{s}/{n}' for s, n in wanted)} "
                       f"({time.perf_counter() - start_time:.1f} s)")

    def _sigmas(self, pl_module: L.LightningModule, spec: EvalSpec) -> Tensor | None:
        """The spec's grid, or None (with a message) when its learned schedule is missing or unusable."""
        learned = pl_module.entropic_schedule
        if spec.schedule == TUNED:
            grids = getattr(pl_module, "tuned_grids", None)
            if grids is None:
                rank_zero_info(f"skipping {spec.name}: no tuned grid yet (it needs a learned schedule to start from)")
                return None
            learned = grids.for_solver(spec.solver)
        elif from_head(spec.schedule) and getattr(pl_module, "head_schedule", None) is not None:
            learned = with_kind(pl_module.head_schedule, learned_kind(spec.schedule))
        elif from_head(spec.schedule):
            rank_zero_info(f"skipping {spec.name}: the network has no log-variance head (model.precond=edm2)")
            return None
        if spec.needs_schedule and getattr(learned, "kind", None) != learned_kind(spec.schedule):
            have = "no learned schedule yet" if learned is None else f"the learned schedule is {learned.kind!r}"
            rank_zero_info(f"skipping {spec.name}: {have}")
            return None
        try:
            return spec.sigmas(pl_module.sigma_min, pl_module.sigma_max, schedule=learned)
        except ValueError as err:  # same schedule on every rank: all ranks skip together
            rank_zero_warn(f"skipping {spec.name}: no sigma grid: {err}")
            return None

    def _sample(self, pl_module: L.LightningModule, spec: EvalSpec, sigmas: Tensor, indices: Tensor) -> Tensor:
        """The samples of `indices` under `spec`, float in the data's range."""
        return generate(
            self._denoiser(pl_module, spec), indices, tuple(pl_module.sample_shape), solver=spec.solver, sigmas=sigmas,
            seed=self.seed, batch_size=self.batch_size, num_classes=pl_module.num_classes, device=pl_module.device,
            **spec.generate_options,
        )

    def evaluate(
        self, trainer: L.Trainer, pl_module: L.LightningModule, spec: EvalSpec, sigmas: Tensor
    ) -> float | None:
        """The score of one spec on the grid `sigmas` over all ranks (call on every rank), or None if it failed."""
        score = self.score.to(pl_module.device)
        score.reset()
        n_failed = 0.0
        share = rank_indices(self.num_samples, trainer.global_rank, trainer.world_size)
        start = last = time.perf_counter()
        done = 0
        # every rank goes through every round of `stoppable` (its collective stop checks), a failed one idle
        for chunk in stoppable(share.split(self.batch_size) if len(share) else (), f"the evaluation of {spec.name}"):
            if n_failed:
                continue
            try:
                x = self._sample(pl_module, spec, sigmas, chunk)
                if not bool(torch.isfinite(x).all()):
                    raise FloatingPointError("non-finite samples")
                score.update(x)
            except Exception:  # one rank failing must not leave the others waiting in compute()
                log.warning("rank %d: generating %s failed", trainer.global_rank, spec.name, exc_info=True)
                n_failed = 1.0
                continue
            done += len(chunk)
            now = time.perf_counter()
            if now - last >= self.progress_every_s and done < len(share):
                last, rate = now, done / (now - start)
                rank_zero_info(f"{spec.name}: {done * trainer.world_size}/{self.num_samples} samples, "
                               f"{rate * trainer.world_size:.0f} img/s, ETA {(len(share) - done) / rate:.0f} s")
        if not len(share) and not n_failed:  # a rank without samples still takes part in compute()
            score.update(torch.empty(0, *pl_module.sample_shape, device=pl_module.device))
        n_failed = float(trainer.strategy.reduce(torch.tensor(n_failed, device=pl_module.device), reduce_op="sum"))
        if n_failed > 0:
            rank_zero_warn(f"skipping {spec.name}: sample generation failed on {int(n_failed)} rank(s)")
            return None
        try:
            return score.compute()
        except Exception as err:  # identical synced state on every rank: all ranks take this branch together
            rank_zero_warn(f"skipping {spec.name}: computing {score.name} failed: {type(err).__name__}: {err}")
            return None

    def _save_grid(self, trainer: L.Trainer, pl_module: L.LightningModule, spec: EvalSpec, sigmas: Tensor) -> None:
        out_dir = Path(self.out_dir if self.out_dir is not None else trainer.default_root_dir)
        path = out_dir / "grids" / f"{spec.name}_{int(pl_module.images_seen)}.png"
        try:
            x = self._sample(pl_module, spec, sigmas, torch.arange(self.grid_size))
            save_grid(to_uint8(x), path, nrow=math.ceil(math.sqrt(self.grid_size)), scale=max(1, 32 // x.shape[-1]))
            for logger in trainer.loggers:
                if isinstance(logger, WandbLogger):
                    logger.log_image(key=f"samples/{spec.name}", images=[str(path)], step=trainer.global_step,
                                     caption=[f"{int(pl_module.images_seen)} images"])
        except Exception:  # a grid is a by-product: never stop training for it
            log.warning("saving the sample grid %s failed", path, exc_info=True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Release the score's memory (extractor and 2 x d^2 float64 sums) after the run."""
        self.score = None
