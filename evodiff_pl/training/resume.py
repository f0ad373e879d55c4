"""Training-side checkpoints: which one a run resumes from, what may change on resume, and how runs end safely.

- `resume_checkpoint` picks the newest complete checkpoint of a run (or the one given), refuses one whose
  settings differ in a way that changes what the run computes, and records the changes that are allowed.
- `RunLock` gives one `train.py` at a time a run directory.
- `PeriodicCheckpoint` writes `last.ckpt` and keeps `step-N.ckpt` archives (never overwritten);
  `AtomicCheckpointIO` makes Lightning write atomically, stamped with a digest (`evodiff_pl.io.checkpointing`).
- `Preemption` turns SIGUSR1 (SLURM's warning before pre-emption or the time limit) and SIGTERM (scancel, the
  limit itself) into one consistent checkpoint at a step boundary on every rank, a requeue, and a non-zero exit.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Iterator

import lightning as L
import torch
import torch.distributed as dist
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_warn
from omegaconf import OmegaConf

from evodiff_pl.io.checkpointing import (
    CHECKPOINT_KEY, VERSION, CheckpointError, checkpoint_candidates, newest_checkpoint, read_checkpoint,
    write_checkpoint,
)
from evodiff_pl.config.schema import Config
from evodiff_pl.utils.dist import world
from evodiff_pl.utils.fileio import atomic_copy

IGNORED = ("run.dir", "run.resume", "run.name", "checkpoint", "logger", "evaluation", "entropic.plot_nfe",
           "trainer.progress_bar", "trainer.val_every_steps", "data.root", "data.download", "data.pin_memory",
           "data.prepare_per_node")
"""Config entries that do not change what a run computes: free to change on resume, not recorded."""
RECORDED = ("data.batch_size", "data.num_workers", "optim.lr", "optim.lr_rampup_images", "optim.ref_images",
            "ema.halflife_images", "ema.rampup_ratio", "ema.snapshot_every_images", "train",
            "entropic.update_every_steps", "trainer", "perf")
"""Entries that may change on resume; each change is recorded in the checkpoints (`config_history`) with the step
from which it applies. Every other entry (model, data, loss, run.seed, optim.betas/eps/schedule, ema.kind/stds, the
tracker) must match."""
ARCHIVE_PATTERN = re.compile(r"step-(\d+)\.ckpt")
_UNSET = "<unset>"


class RunLockedError(RuntimeError):
    """Another train.py holds the run directory."""


class Preempted(Exception):
    """The run stopped at a step boundary after SIGUSR1 or SIGTERM, with a checkpoint written."""

    def __init__(self, signum: int, step: int, path: Path, requeued: bool) -> None:
        self.signum, self.step, self.path, self.requeued = signum, step, path, requeued
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} after step {step}; checkpoint {path} written"
                         + ("; SLURM job requeued" if requeued else "; rerun the same command to resume"))

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial file and stamps every checkpoint with its digest."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        write_checkpoint(path, checkpoint)


def _flatten(d: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(d, dict):
        for k, v in d.items():
            yield from _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    else:
        yield prefix, d


def _under(key: str, entries: tuple[str, ...]) -> bool:
    return any(key == e or key.startswith(e + ".") for e in entries)


def config_changes(saved: dict[str, Any], config: dict[str, Any], path: str | Path) -> dict[str, list[Any]]:
    """The recorded changes {key: [old, new]} from a checkpoint's config to `config`; CheckpointError naming every
    other difference. Keys an older checkpoint lacks count as their schema default."""
    defaults = dict(_flatten(OmegaConf.to_container(OmegaConf.structured(Config))))
    old, new = dict(_flatten(saved)), dict(_flatten(config))
    diffs, changes = [], {}
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, defaults.get(key, _UNSET)), new.get(key, defaults.get(key, _UNSET))
        if a == b or _under(key, IGNORED):
            continue
        if _under(key, RECORDED):
            changes[key] = [a, b]
        else:
            diffs.append(f"{key}: checkpoint {a!r}, config {b!r}")
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} does not match the config ({'; '.join(diffs)}). It was left untouched: use the "
            "checkpoint's settings (its config.yaml), or another run.dir to start a new run"
        )
    return changes


def archives(ckpt_dir: str | Path) -> list[Path]:
    """The step-N.ckpt archives of a run, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    found = [p for p in ckpt_dir.iterdir() if ARCHIVE_PATTERN.fullmatch(p.name)] if ckpt_dir.is_dir() else []
    return sorted(found, key=lambda p: int(ARCHIVE_PATTERN.fullmatch(p.name).group(1)))


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, with the settings that changed since it was written."""

    path: Path
    meta: dict[str, Any]
    """The checkpoint's `evodiff` entry."""
    changes: dict[str, list[Any]] = field(default_factory=dict)

    @property
    def history(self) -> list[dict[str, Any]]:
        """The checkpoint's `config_history`, plus this resume's changes (if any) from its step on."""
        past = list(self.meta.get("config_history", []))
        if self.changes:
            past.append({"global_step": int(self.meta["global_step"]), "images_seen": int(self.meta["images_seen"]),
                         "changes": self.changes})
        return past


def resume_checkpoint(resume: str, ckpt_dir: str | Path, config: dict[str, Any]) -> ResumePoint | None:
    """The checkpoint to resume from for `run.resume` (auto | never | path), validated against `config`.

    auto refuses to start over when the run has step-N archives but no last.ckpt (it was moved away), and names
    the run.resume=PATH that continues from the newest archive."""
    kept = archives(ckpt_dir)
    if resume == "never":
        existing = checkpoint_candidates(ckpt_dir) + kept
        if existing:
            raise CheckpointError(f"run.resume=never but {existing[0]} exists; it is never overwritten: choose another "
                                  "run.dir or run.resume=auto to continue that run")
        return None
    path = newest_checkpoint(ckpt_dir) if resume == "auto" else Path(resume)
    if path is None and kept:
        raise CheckpointError(f"{ckpt_dir} has no last.ckpt but holds archives up to {kept[-1].name}: this run is not "
                              f"started over. To continue from the newest archive rerun with run.resume={kept[-1]}; "
                              "to start a new run choose another run.dir")
    if path is None:
        return None
    meta = read_checkpoint(path)[CHECKPOINT_KEY]
    if meta["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta['version']} (the U-Net layout before "
                              "NVlabs'); it can be sampled from (load_denoiser, sample.py) but not resumed")
    return ResumePoint(path, meta, config_changes(meta["config"], config, path))


def mark_completed(path: str | Path, updates: dict[str, Any] | None = None) -> None:
    """Record in a checkpoint that its run finished, final evaluation included, with `updates` of its training
    state made by that evaluation (the tuned grids); rewritten atomically when anything changes."""
    ckpt = read_checkpoint(path)
    new = {"completed": True, **(updates or {})}
    if any(ckpt[CHECKPOINT_KEY].get(k) != v for k, v in new.items()):
        ckpt[CHECKPOINT_KEY].update(new)
        write_checkpoint(path, ckpt)


class RunLock:
    """One train.py per run directory: `<run.dir>/train.lock` holds the owner's host, pid and SLURM job id.

    A lock is stale (and taken over) when its process is gone on this host, or when it belongs to this same SLURM
    job (a requeued job restarts under its own id, possibly on another node). Taken by global rank 0 only.
    """

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "train.lock"
        self.owner = {"host": socket.gethostname(), "pid": os.getpid(), "slurm_job": os.environ.get("SLURM_JOB_ID"),
                      "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def _holder(self) -> dict[str, Any] | None:
        try:
            return json.loads(self.path.read_text())
        except (OSError, ValueError):
            return None

    def _stale(self, holder: dict[str, Any]) -> bool:
        if holder.get("slurm_job") and holder["slurm_job"] == self.owner["slurm_job"]:
            return True
        if holder.get("host") != self.owner["host"]:
            return False
        try:
            os.kill(int(holder["pid"]), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError, TypeError, KeyError):
            return False
        return False

    def acquire(self) -> None:
        """Take the lock, replacing a stale one; RunLockedError naming the holder otherwise."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self._stale(holder):
                    raise RunLockedError(
                        f"run.dir {self.path.parent} is in use by another train.py (host {holder.get('host')}, pid "
                        f"{holder.get('pid')}, started {holder.get('started')}); wait for it, or use another run.dir. "
                        f"If that process is gone (another node crashed), delete {self.path}"
                    ) from None
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.owner, f)
            self.held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps replacing it")

    def release(self) -> None:
        """Remove the lock if this process holds it."""
        if self.held and (self._holder() or {}).get("pid") == self.owner["pid"]:
            self.path.unlink(missing_ok=True)
        self.held = False


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

    def save_last(self, trainer: L.Trainer) -> Path:
        """Write last.ckpt for the current step (every rank calls it; once per step)."""
        if trainer.global_step != self._saved_step:
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


class StopSignals:
    """SIGUSR1 and SIGTERM set `received` (the first signal's number) and do nothing else: no I/O and no collective
    inside a signal handler. Installed by train.py before anything else, so a signal during start-up is kept too."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum

    def install(self) -> None:
        """Take SIGUSR1 and SIGTERM (from the main thread), remembering the handlers they replace the first time."""
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers `install` found; forget any signal received."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.received = 0


STOP = StopSignals()
"""The process's stop signals (signal handlers are per process)."""


class Preemption(L.Callback):
    """Acts on `STOP` at step boundaries. After each whole training step the ranks agree on it (one all-reduce of a
    CPU integer over a gloo group, so no device synchronisation); if any rank got a signal, all take part in
    writing last.ckpt through `periodic`, rank 0 requeues the SLURM job (SIGUSR1 with SLURM_JOB_ID set:
    `scontrol requeue`), and every rank raises `Preempted` (train.py exits with 128 + the signal number).
    Lightning installs its own SIGTERM handler when fitting starts; `on_train_start` takes the signals back."""

    def __init__(self, periodic: PeriodicCheckpoint, signals: StopSignals = STOP) -> None:
        self.periodic = periodic
        self.signals = signals
        self._group: dist.ProcessGroup | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.signals.install()
        if world()[1] > 1 and self._group is None:
            self._group = dist.new_group(backend="gloo")

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        flag = torch.tensor([self.signals.received], dtype=torch.int64)
        if self._group is not None:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
        signum = int(flag.item())
        if not signum:
            return
        path = self.periodic.save_last(trainer)
        requeued = trainer.is_global_zero and signum == signal.SIGUSR1 and _requeue()
        raise Preempted(signum, trainer.global_step, path, requeued)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._group is not None:
            dist.destroy_process_group(self._group)
            self._group = None


def _requeue() -> bool:
    """`scontrol requeue` this SLURM job (array tasks included); False outside SLURM or when it fails."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        rank_zero_warn(f"requeueing SLURM job {job} failed: {err}")
        return False
    if done.returncode:
        rank_zero_warn(f"requeueing SLURM job {job} failed ({done.returncode}): {done.stderr.strip()}")
    return done.returncode == 0
