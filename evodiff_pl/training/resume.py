"""Training-side checkpoints: which one a run resumes from, what may change on resume, and how runs end safely.

- `resume_checkpoint` (`evodiff_pl.training.resume_point`) picks the newest complete checkpoint of a
  run (or the one given), refuses one whose settings differ in a way that changes what the run computes, and
  records the changes that are allowed.
- `PeriodicCheckpoint` writes `last.ckpt` and keeps `step-N.ckpt` archives (never overwritten);
  `AtomicCheckpointIO` makes Lightning write atomically, stamped with a digest (`evodiff_pl.io.checkpointing`).
- `Preemption` turns SIGUSR1 (SLURM's warning before pre-emption or the time limit) and SIGTERM (scancel, the
  limit itself), wherever they come (`evodiff_pl.utils.stop`), into the checkpoint of the last whole step on every
  rank, a requeue, and a non-zero exit; `keep_stop_handlers` keeps Lightning's own handler out.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from evodiff_pl.io.checkpointing import read_checkpoint, write_checkpoint
from evodiff_pl.utils.fileio import atomic_copy
from evodiff_pl.utils.stop import STOP, Stopped, raise_if_stopped, requeue


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial file and stamps every checkpoint with its digest."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        write_checkpoint(path, checkpoint)


class PeriodicCheckpoint(L.Callback):
    """Writes `last.ckpt` every `every_steps` optimizer steps and at the last step (all ranks take part, rank 0
    writes), and keeps an archive `step-N.ckpt` every `keep_every_steps` steps (0: none). An archive is never
    overwritten; one whose copy was interrupted is made when the run resumes at its step."""

    def __init__(self, ckpt_dir: str | Path, every_steps: int, keep_every_steps: int = 0) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.every_steps = every_steps
        self.keep_every_steps = keep_every_steps
        self._saved_step = -1

    @property
    def last(self) -> Path:
        return self.ckpt_dir / "last.ckpt"

    def _keeps(self, step: int) -> bool:
        return self.keep_every_steps > 0 and step > 0 and step % self.keep_every_steps == 0

    def _archive(self, trainer: L.Trainer, step: int) -> None:
        target = self.ckpt_dir / f"step-{step}.ckpt"
        if trainer.is_global_zero and not target.exists():
            atomic_copy(self.last, target)

    def save_last(self, trainer: L.Trainer, force: bool = False) -> Path:
        """Write last.ckpt for the current step (every rank calls it; once per step unless `force`)."""
        if force or trainer.global_step != self._saved_step:
            self._saved_step = trainer.global_step
            trainer.save_checkpoint(self.last, weights_only=False)
        return self.last

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if self._keeps(step) and self.last.is_file() and int(read_checkpoint(self.last, verify=False)["global_step"]) == step:
            self._archive(trainer, step)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        keep = self._keeps(step)
        if step == 0 or not (step % self.every_steps == 0 or step >= trainer.max_steps or keep):
            return
        self.save_last(trainer)
        if keep:
            self._archive(trainer, step)


def keep_stop_handlers(trainer: L.Trainer) -> None:
    """Keep `STOP` the only SIGUSR1/SIGTERM handler while `trainer` runs. Lightning installs its own SIGTERM handler
    when a trainer function starts (it broadcasts from inside the handler, so SIGTERM to one rank hangs the others,
    and it lets `fit` return as if finished); with no public switch to turn it off, its registration installs
    `STOP` instead (its SLURM requeue is off too: `SLURMEnvironment(auto_requeue=False)`)."""
    trainer._signal_connector.register_signal_handlers = STOP.install


class Preemption(L.Callback):
    """Acts on `STOP` (`evodiff_pl.utils.stop`) in training. The ranks agree on it at set-up (the first point where
    they can: the process group exists) and after each whole training step; the evaluation callback checks it
    between generated batches. When any rank got a signal every rank raises `Stopped`, and `on_exception` has all
    ranks write last.ckpt through `periodic` (the state after the last whole step; rewritten during an evaluation so
    that it records the evaluation as pending, to be redone by the rerun) and rank 0 requeue the SLURM job on
    SIGUSR1 (`scontrol requeue`); train.py exits with 128 + the signal number. Before training starts (set-up, or a
    rerun's final evaluation) the checkpoint resumed from is already the last whole step's: nothing is written."""

    def __init__(self, periodic: PeriodicCheckpoint) -> None:
        self.periodic = periodic
        self._training = False

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        raise_if_stopped("set-up")

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._training = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        raise_if_stopped("training")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if not isinstance(exception, Stopped) or exception.path is not None:
            return
        if self._training:
            exception.path = self.periodic.save_last(trainer, force=trainer.validating)
            exception.step = trainer.global_step
        if trainer.is_global_zero and exception.signum == signal.SIGUSR1:
            exception.requeued = requeue()

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._training = False
