"""Build a training run from a validated config and fit it: the body of `train.py`.

Run directory layout (`run.dir`): `config.yaml` (the resolved config of the latest launch),
`checkpoints/last.ckpt` (+ `step-N.ckpt` archives; `hpc_ckpt_N.ckpt` from older versions), `schedule.json`
(the learned schedule), `plots/` (loss per σ, schedule), `grids/` (samples), `wandb/` or `csv/` logs,
`wandb_run_id`, and `train.lock` while a train.py runs there. Resume = run the same command again
(`run.resume=auto`); a run whose training finished but whose final evaluation did not (killed during it)
runs that evaluation on the rerun. SIGUSR1 / SIGTERM stop every rank within seconds wherever the run is, with the
checkpoint of the last whole step (`evodiff_pl.utils.stop`, `resume.Preemption`); an evaluation they interrupt is
redone by the rerun. The command line (`main`) is `evodiff_pl.training.cli`, which imports this module only to train.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar

import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.fabric.utilities.rank_zero import rank_zero_only
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import DictConfig, OmegaConf

from evodiff_pl.data.augment import AUGMENT_DIM
from evodiff_pl.io.checkpointing import CheckpointError
from evodiff_pl.config.schema import ConfigError, to_dict
from evodiff_pl.data.datasets import DataError, DatasetNotFoundError, build_from_config
from evodiff_pl.data.stream import DiffusionDataModule
from evodiff_pl.training.datamodule import as_lightning
from evodiff_pl.utils.fileio import atomic_write_text, remove_stale_temps
from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.training.quiet import quiet_lightning
from evodiff_pl.training.loggers import (PlainProgress, ScheduleArtifacts, StepProgressBar, build_logger, finish_wandb,
                                is_terminal, use_kimg_axis)
from evodiff_pl.config.keys import signature_params
from evodiff_pl.evaluation.metrics import InceptionWeightsError
from evodiff_pl.training.accumulate import check_batch_gpu
from evodiff_pl.sampling.generate import EvalSpec
from evodiff_pl.training.best import BestCheckpoint
from evodiff_pl.training.module import EDMModule
from evodiff_pl.training.transfer import init_from
from evodiff_pl.training.nonfinite import NonFiniteTrainingError
from evodiff_pl.networks import NETWORKS, build_network
from evodiff_pl.networks.precond import has_logvar_head
from evodiff_pl.training.losses import LOSSES
from evodiff_pl.networks.precond import build_precond
from evodiff_pl.training.lock import RunLock, RunLockedError
from evodiff_pl.training.resume import (
    AtomicCheckpointIO, PeriodicCheckpoint, Preemption, keep_stop_handlers,
)
from evodiff_pl.training.resume_point import ResumePoint, mark_completed, resume_checkpoint
from evodiff_pl.utils.stop import STOP, Stopped, raise_if_stopped

T = TypeVar("T")

USER_ERRORS = (ConfigError, CheckpointError, DatasetNotFoundError, DataError, NonFiniteTrainingError, RunLockedError,
               InceptionWeightsError)
"""Errors reported as one line (no traceback) by `main`."""


@dataclass
class TrainingRun:
    """Everything `fit` needs."""

    trainer: L.Trainer
    module: EDMModule
    datamodule: DiffusionDataModule
    resume: ResumePoint | None
    """Checkpoint to resume from (None: fresh start)."""
    run_dir: Path
    config: dict[str, Any]
    """The resolved config as run (the effective precision included), as stored in checkpoints and config.yaml."""

    @property
    def ckpt_path(self) -> Path | None:
        return self.resume.path if self.resume is not None else None

    @property
    def finished_training(self) -> bool:
        """The resume checkpoint is at max_steps: only the final evaluation may be left."""
        return self.resume is not None and int(self.resume.meta["global_step"]) >= self.trainer.max_steps


def construct(section: str, factory: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """`factory(*args, **kwargs)`, with a ValueError or TypeError reported as a ConfigError of `section`."""
    try:
        return factory(*args, **kwargs)
    except (ValueError, TypeError) as err:
        raise ConfigError(f"{section}: {err}") from err


def network_kwargs(name: str, net: dict[str, Any], shape: Sequence[int], num_classes: int,
                   augment_dim: int = 0) -> dict[str, Any]:
    """The backbone's kwargs: the configured ones plus the shape and label arguments it takes, from the data
    (and `augment_dim`, the width of the augmentation labels, when augmenting)."""
    derived = {"img_resolution": shape[-1], "in_channels": shape[0], "out_channels": shape[0],
               "dim": math.prod(shape), "label_dim": num_classes}
    if augment_dim:
        derived["augment_dim"] = augment_dim
    params = signature_params(NETWORKS[name])
    kwargs = dict(net)
    for key, value in derived.items():
        if key not in params:
            continue
        if key in kwargs and kwargs[key] != value:
            raise ConfigError(f"model.net.{key}={kwargs[key]!r} does not match the data ({key}={value!r}); "
                              "leave it out, it is set from the data")
        kwargs[key] = value
    return kwargs


def build_data(cfg: DictConfig) -> DiffusionDataModule:
    """The datamodule of `cfg.data` (batch_size is global), seeded by run.seed unless data.seed is set."""
    return construct("data", build_from_config, OmegaConf.to_container(cfg.data), cfg.run.seed)


def build_callbacks(cfg: DictConfig, run_dir: Path) -> list[L.Callback]:
    """Checkpoints, schedule artifacts, progress bar and (if enabled) the evaluation callback."""
    periodic = PeriodicCheckpoint(run_dir / "checkpoints", cfg.checkpoint.every_steps, cfg.checkpoint.keep_every_steps)
    callbacks: list[L.Callback] = [periodic, Preemption(periodic), ScheduleArtifacts(run_dir, plot_nfe=cfg.entropic.plot_nfe)]
    if cfg.trainer.progress_bar:
        every = cfg.logger.log_every_steps
        callbacks.append(StepProgressBar(refresh_rate=max(1, min(every, 10))) if is_terminal() else PlainProgress(every))
    evaluation = OmegaConf.to_container(cfg.evaluation)
    enabled = evaluation.pop("enabled", True)
    if enabled:
        evaluation.setdefault("out_dir", str(run_dir))
        callbacks.append(construct("evaluation", SampleQualityCallback, **evaluation))
    if cfg.checkpoint.best_spec is not None:
        names = [spec.name for spec in callbacks[-1].specs] if enabled else []
        best = construct("checkpoint.best_spec", EvalSpec.parse, cfg.checkpoint.best_spec).name
        if best not in names:
            raise ConfigError(f"checkpoint.best_spec={cfg.checkpoint.best_spec} is not tracked: add it to "
                              f"evaluation.specs{'' if enabled else ' and set evaluation.enabled=true'}")
        callbacks.append(BestCheckpoint(run_dir / "checkpoints", best))
    return callbacks


def configure_backends(perf: Any) -> None:
    """The process-wide CUDA switches of `perf` (set only when asked for: the defaults stay torch's)."""
    if perf.tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    if perf.cudnn_benchmark:
        torch.backends.cudnn.benchmark = True


def build(cfg: DictConfig) -> TrainingRun:
    """Model, data, trainer and resume checkpoint for a validated config (writes at most the W&B run id file)."""
    run_dir = Path(cfg.run.dir)
    ckpt_dir = run_dir / "checkpoints"
    config = to_dict(cfg)
    resume = resume_checkpoint(cfg.run.resume, ckpt_dir, config)
    if cfg.perf.sync_free_step and cfg.trainer.precision == "16-mixed":
        raise ConfigError("perf.sync_free_step does not work with trainer.precision=16-mixed (its GradScaler decides "
                          "the skip on the host); use bf16-mixed or 32-true")
    configure_backends(cfg.perf)
    L.seed_everything(cfg.run.seed, workers=True, verbose=False)
    datamodule = build_data(cfg)
    shape, num_classes = tuple(datamodule.shape), datamodule.num_classes
    net_kwargs = network_kwargs(cfg.model.network, OmegaConf.to_container(cfg.model.net), shape, num_classes,
                                AUGMENT_DIM if datamodule.augment else 0)
    backbone = construct("model.net", build_network, cfg.model.network, **net_kwargs)
    precond = {"name": cfg.model.precond, "kwargs": {"sigma_data": cfg.model.sigma_data}}
    net = construct("model.precond", build_precond, precond["name"], backbone, **precond["kwargs"])
    if cfg.loss.kind == "edm2" and not has_logvar_head(net):
        raise ConfigError(f"loss.kind=edm2 needs a network with a log-variance head; model.precond="
                          f"{cfg.model.precond!r} has none (use model.precond=edm2)")
    meta = {
        "config": config,
        "network": {"name": cfg.model.network, "kwargs": net_kwargs}, "precond": precond,
        "sigma_data": cfg.model.sigma_data, "sigma_min": cfg.model.sigma_min, "sigma_max": cfg.model.sigma_max,
        "sample_shape": list(shape), "num_classes": num_classes,
        "data": {"name": cfg.data.name, "stats_key": datamodule.stats_key()},
        "config_history": resume.history if resume is not None else [],
    }
    module = EDMModule(
        net, LOSSES[cfg.loss.kind](cfg.loss.P_mean, cfg.loss.P_std, cfg.model.sigma_data),
        sample_shape=shape, num_classes=num_classes, global_batch=cfg.data.batch_size, seed=cfg.run.seed,
        sigma_range=(cfg.model.sigma_min, cfg.model.sigma_max), optim=OmegaConf.to_object(cfg.optim),
        ema=OmegaConf.to_object(cfg.ema), entropic=OmegaConf.to_object(cfg.entropic),
        train=OmegaConf.to_object(cfg.train), perf=OmegaConf.to_object(cfg.perf), checkpoint_dir=ckpt_dir,
        snapshot_dir=run_dir, meta=meta, augment=datamodule.augment, batch_gpu=datamodule.batch_gpu,
    )
    if resume is None and cfg.model.init:
        init_from(module, cfg.model.init)
    plugins: list[Any] = [AtomicCheckpointIO()]
    if SLURMEnvironment.detect():  # ranks from SLURM; pre-emption is `Preemption`'s, not Lightning's requeue
        plugins.append(SLURMEnvironment(auto_requeue=False))
    logger = build_logger(cfg.logger, run_dir, cfg.run.name or run_dir.resolve().name, rank_zero_only.rank == 0)
    t = OmegaConf.to_container(cfg.trainer)
    callbacks = build_callbacks(cfg, run_dir)
    try:
        trainer = L.Trainer(
            accelerator=t["accelerator"], devices=t["devices"], num_nodes=t["num_nodes"], strategy=t["strategy"],
            precision=t["precision"], max_steps=math.ceil(cfg.train.total_images / cfg.data.batch_size), max_epochs=-1,
            logger=logger or False, callbacks=callbacks, plugins=plugins,
            default_root_dir=str(ckpt_dir), enable_checkpointing=False, use_distributed_sampler=False,
            val_check_interval=t["val_every_steps"], check_val_every_n_epoch=None, limit_val_batches=1,
            num_sanity_val_steps=0, log_every_n_steps=cfg.logger.log_every_steps, enable_progress_bar=t["progress_bar"],
        )
    except (MisconfigurationException, ModuleNotFoundError, RuntimeError, ValueError) as err:
        raise ConfigError(f"trainer (accelerator={t['accelerator']}, devices={t['devices']}, strategy={t['strategy']}, "
                          f"precision={t['precision']}): {str(err).splitlines()[0]}") from None
    if str(trainer.precision) != t["precision"]:
        rank_zero_warn(f"trainer.precision={t['precision']} runs as {trainer.precision} on this accelerator; the run "
                       f"records {trainer.precision}")
        config["trainer"]["precision"] = str(trainer.precision)
        if resume is not None and resume.changes.get("trainer.precision", [None])[0] == str(trainer.precision):
            del resume.changes["trainer.precision"]  # the checkpoint recorded the precision that runs: no change
            module.meta["config_history"] = resume.history
    if cfg.data.batch_size % trainer.world_size:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size} (the global batch) is not divisible by the "
                          f"{trainer.world_size} processes (trainer.devices x trainer.num_nodes)")
    check_batch_gpu(datamodule.batch_gpu, cfg.data.batch_size, trainer.world_size)
    keep_stop_handlers(trainer)
    datamodule.stream_from(int(resume.meta["images_seen"]) if resume is not None else 0)
    return TrainingRun(trainer, module, datamodule, resume, run_dir, config)


def run(cfg: DictConfig) -> TrainingRun:
    """Take the run directory (rank 0), print and save the config, then fit, resuming from the newest checkpoint
    if any; a run that finished training but not its final evaluation only evaluates. The finished run's
    last.ckpt is marked completed. A stop signal raises `Stopped` (naming the checkpoint of the last whole step)."""
    STOP.install()
    quiet_lightning()
    lock = RunLock(cfg.run.dir)
    training = None
    try:
        if rank_zero_only.rank == 0:
            lock.acquire()
        raise_if_stopped("set-up")
        training = build(cfg)
        raise_if_stopped("set-up")
        if rank_zero_only.rank == 0:
            for stale in remove_stale_temps(training.run_dir / "checkpoints"):
                print(f"removed {stale} (a checkpoint write interrupted by a kill)", flush=True)
            text = OmegaConf.to_yaml(OmegaConf.create(training.config))
            print(text, flush=True)
            atomic_write_text(training.run_dir / "config.yaml", text)
            if training.ckpt_path is not None:
                print(f"resuming from {training.ckpt_path}", flush=True)
        use_kimg_axis(training.trainer.loggers)
        for logger in training.trainer.loggers:
            logger.log_hyperparams(training.config)
        _fit(training)
    except Stopped as stop:
        if stop.path is None and training is not None and training.resume is not None:
            stop.path, stop.step = training.resume.path, int(training.resume.meta["global_step"])
        raise
    finally:
        lock.release()
        STOP.uninstall()
    return training


def _fit(training: TrainingRun) -> None:
    exit_code = 1
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")  # the EMA copy, on purpose
            if training.finished_training and training.resume.meta.get("completed"):
                print(f"{training.ckpt_path} is complete (training and final evaluation): nothing to do", flush=True)
            elif training.finished_training:
                print("training finished but its final evaluation did not: running it now", flush=True)
                training.trainer.validate(training.module, datamodule=as_lightning(training.datamodule),
                                          ckpt_path=training.ckpt_path, weights_only=True, verbose=False)
            elif not training.finished_training:
                training.trainer.fit(training.module, datamodule=as_lightning(training.datamodule),
                                     ckpt_path=training.ckpt_path, weights_only=True)
        last = training.run_dir / "checkpoints" / "last.ckpt"
        if training.trainer.is_global_zero and last.is_file():
            tuned = training.module.tuned_grids  # tuned by the final evaluation, after the last checkpoint
            mark_completed(last, {"tuned": tuned.to_dict()} if tuned is not None else None)
        exit_code = 0
    finally:
        finish_wandb(exit_code)


def _one_line(err: BaseException) -> str:
    """The message of an error, on one line (a DataLoader worker's re-raised error: its original message)."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    if "Original Traceback" in str(err) and lines:
        return lines[-1].split(": ", 1)[-1]
    return " ".join(line.strip() for line in lines)
