"""Training-side checkpoints: which one a run resumes from, what must match, and how Lightning writes them.

`resume_checkpoint` picks the newest complete checkpoint of a run (or the one given) and refuses one whose model,
data or tracker settings differ from the config; `AtomicCheckpointIO` makes Lightning write atomically;
`PeriodicCheckpoint` writes `last.ckpt` and keeps `step-N.ckpt` copies. The format itself is
`evodiff_pl.checkpointing`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from evodiff_pl.checkpointing import (
    CHECKPOINT_KEY, CheckpointError, checkpoint_candidates, newest_checkpoint, read_checkpoint,
)
from evodiff_pl.fileio import atomic_copy, atomic_write

COMPARED_SECTIONS = ("model", "data", "entropic.n_bins", "entropic.ema_decay")
"""Config entries that must match between a checkpoint and the run resuming it."""
FREE_KEYS = ("data.batch_size", "data.num_workers")
"""Entries of the compared sections that may change on resume (schedules are counted in images)."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial file: temp file in the same folder, fsync, os.replace."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def _select(cfg: dict[str, Any], dotted: str) -> Any:
    node: Any = cfg
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def check_compatible(ckpt: dict[str, Any], path: str | Path, config: dict[str, Any]) -> None:
    """CheckpointError if the model, data or tracker settings of `config` differ from the checkpoint's."""
    saved = ckpt[CHECKPOINT_KEY]["config"]
    diffs = []
    for section in COMPARED_SECTIONS:
        old = dict(_flatten(_select(saved, section), section))
        new = dict(_flatten(_select(config, section), section))
        for key in sorted(set(old) | set(new)):
            if key not in FREE_KEYS and old.get(key, "<unset>") != new.get(key, "<unset>"):
                diffs.append(f"{key}: checkpoint {old.get(key, '<unset>')!r}, config {new.get(key, '<unset>')!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not match the config ({'; '.join(diffs)}). It was left untouched: use the "
            "checkpoint's settings (its config.yaml), or another run.dir to start a new run"
        )


def resume_checkpoint(resume: str, ckpt_dir: str | Path, config: dict[str, Any]) -> Path | None:
    """The checkpoint to resume from for `run.resume` (auto | never | path), validated against `config`."""
    if resume == "never":
        existing = checkpoint_candidates(ckpt_dir)
        if existing:
            raise CheckpointError(f"run.resume=never but {existing[0]} exists; it is never overwritten: choose another "
                                  "run.dir or run.resume=auto to continue that run")
        return None
    path = newest_checkpoint(ckpt_dir) if resume == "auto" else Path(resume)
    if path is None:
        return None
    check_compatible(read_checkpoint(path), path, config)
    return path


class PeriodicCheckpoint(L.Callback):
    """Writes `last.ckpt` every `every_steps` optimizer steps and at the last step (all ranks take part, rank 0
    writes), and keeps a copy `step-N.ckpt` every `keep_every_steps` steps (0: none)."""

    def __init__(self, ckpt_dir: str | Path, every_steps: int, keep_every_steps: int = 0) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.every_steps = every_steps
        self.keep_every_steps = keep_every_steps
        self._saved_step = -1

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        step = trainer.global_step
        keep = self.keep_every_steps > 0 and step % self.keep_every_steps == 0
        due = step % self.every_steps == 0 or step >= trainer.max_steps or keep
        if step == 0 or step == self._saved_step or not due:
            return
        self._saved_step = step
        last = self.ckpt_dir / "last.ckpt"
        trainer.save_checkpoint(last, weights_only=False)
        if keep and trainer.is_global_zero:
            atomic_copy(last, self.ckpt_dir / f"step-{step}.ckpt")
