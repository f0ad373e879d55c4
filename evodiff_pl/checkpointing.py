"""Checkpoint files: atomic writes, resume discovery and validation, and loading a denoiser for sampling.

Format (a Lightning checkpoint, loadable with `torch.load(..., weights_only=True)`):
- `state_dict`: `net.*` the trained EDMPrecond (backbone under `net.backbone.*`), `ema.*` its EMA copy;
- `optimizer_states`, `loops`, `callbacks`, `global_step`, ...: Lightning's training state;
- `evodiff` (`CHECKPOINT_KEY`): `format`, `version`, `config` (the resolved config), `network`
  (`name`, `kwargs`: everything `evodiff_pl.networks.build_network` needs), `precond` (`name`, `kwargs` of
  `evodiff_pl.precond.build_precond`; absent before version 2: EDM with `sigma_data`), `sigma_data`, `sigma_min`,
  `sigma_max`, `sample_shape`, `num_classes`, `data` (`name`, `stats_key`), `images_seen`,
  `batches_seen`, `global_step`, `tracker`, `schedule` (`EntropicSchedule.to_dict()` or None), `rng`.
`load_denoiser` rebuilds the (EMA) denoiser and its schedule from this without the training code.
Version 2: the U-Nets have NVlabs edm's parameter layout; version 1 files (the older SongUNet layout) are
mapped on load (`networks.unet.upgrade_v1_songunet`) and can be sampled from, not resumed.
NVlabs pickles (`.pkl`) are read by `evodiff_pl.nvlabs`.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from evodiff_pl.entropic import EntropicSchedule
from evodiff_pl.networks import build_network
from evodiff_pl.networks.unet import upgrade_v1_songunet
from evodiff_pl.precond import Precond, build_precond

CHECKPOINT_KEY = "evodiff"
FORMAT = "evodiff-pl/checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")
COMPARED_SECTIONS = ("model", "data", "entropic.n_bins", "entropic.ema_decay")
"""Config entries that must match between a checkpoint and the run resuming it."""
FREE_KEYS = ("data.batch_size", "data.num_workers")
"""Entries of the compared sections that may change on resume (schedules are counted in images)."""


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, not ours, or made for another model or dataset."""


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)` into a temporary file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` for a text file."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically (temporary file in the destination folder, fsync, rename)."""
    with open(src, "rb") as f_src:
        atomic_write(dst, lambda f: shutil.copyfileobj(f_src, f))


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning CheckpointIO that never leaves a partial file: temp file in the same folder, fsync, os.replace."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError(f"AtomicCheckpointIO takes no storage_options, got {storage_options!r}")
        atomic_write(path, lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load a checkpoint on the CPU (memory-mapped, weights only); CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {path} is unreadable (truncated or corrupt?): {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}. It was left untouched; move it "
                              "away to resume from another checkpoint, or set run.resume=never with a new run.dir"
                              ) from None
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by evodiff-pl's train.py (no {CHECKPOINT_KEY!r} entry)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this code reads "
                              f"{READABLE_VERSIONS}")
    return ckpt


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


def _stored_step(path: Path) -> int:
    return int(read_checkpoint(path)["global_step"])


def checkpoint_candidates(ckpt_dir: str | Path) -> list[Path]:
    """last.ckpt and SLURM pre-emption checkpoints hpc_ckpt_N.ckpt in `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    found = [p for p in ckpt_dir.iterdir() if p.name == "last.ckpt" or HPC_PATTERN.fullmatch(p.name)]
    return sorted(found)


def newest_checkpoint(ckpt_dir: str | Path) -> Path | None:
    """The candidate with the highest stored global step (the newer file on a tie); every candidate must be readable."""
    candidates = checkpoint_candidates(ckpt_dir)
    if not candidates:
        return None
    return max(candidates, key=lambda p: (_stored_step(p), p.stat().st_mtime_ns))


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
    ckpt = read_checkpoint(path)
    if ckpt[CHECKPOINT_KEY]["version"] != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {ckpt[CHECKPOINT_KEY]['version']} (the U-Net "
                              "layout before NVlabs'); it can be sampled from (load_denoiser) but not resumed")
    check_compatible(ckpt, path, config)
    return path


@dataclass
class LoadedCheckpoint:
    """A denoiser rebuilt from a checkpoint, with its learned schedule and metadata."""

    denoiser: Precond
    """The preconditioned denoiser D(x, sigma, labels) in eval mode with the EMA (default) or raw weights."""
    schedule: EntropicSchedule | None
    """The entropic schedule stored in the checkpoint (None if it had none yet)."""
    meta: dict[str, Any]
    """The checkpoint's `evodiff` entry (config, network, sample_shape, num_classes, sigma range, ...)."""
    path: Path
    """The checkpoint file."""


def locate_checkpoint(path: str | Path) -> Path:
    """A checkpoint file, or the newest checkpoint of a run directory (or of its checkpoints/ folder)."""
    path = Path(path)
    if path.is_dir():
        folder = path / "checkpoints" if (path / "checkpoints").is_dir() else path
        found = newest_checkpoint(folder)
        if found is None:
            raise CheckpointError(f"no checkpoint (last.ckpt or hpc_ckpt_N.ckpt) in {folder}")
        return found
    return path


def _prefix(ema: bool) -> str:
    return "ema." if ema else "net."


def _weights(ckpt: dict[str, Any], path: Path, ema: bool) -> dict[str, torch.Tensor]:
    """The checkpoint's EMA (or raw) weights, keys still prefixed; CheckpointError if it holds none."""
    prefix = _prefix(ema)
    state = {k: v for k, v in ckpt["state_dict"].items() if k.startswith(prefix)}
    if not state:
        raise CheckpointError(f"checkpoint {path} holds no {prefix!r} weights (an `export_weights` copy keeps only "
                              f"one set: load it with ema={not ema})")
    return state


def load_denoiser(path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the denoiser of a train.py checkpoint (file or run directory), or of an NVlabs edm pickle (`.pkl`,
    see `evodiff_pl.nvlabs`), for sampling; no Lightning module needed."""
    if Path(path).suffix == ".pkl":
        from evodiff_pl.nvlabs import load_nvlabs_pickle

        return load_nvlabs_pickle(path, map_location=map_location)
    path = locate_checkpoint(path)
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    net = meta["network"]
    precond = meta.get("precond", {"name": "edm", "kwargs": {"sigma_data": meta["sigma_data"]}})
    denoiser = build_precond(precond["name"], build_network(net["name"], **net["kwargs"]), **precond["kwargs"])
    prefix = _prefix(ema)
    state = {k[len(prefix):]: v for k, v in _weights(ckpt, path, ema).items()}
    if meta["version"] == 1 and net["name"] == "songunet":
        state = upgrade_v1_songunet(state, denoiser.backbone, prefix="backbone.")
    missing, unexpected = denoiser.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"checkpoint {path}: the weights under {prefix!r} do not fit the network "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    schedule = EntropicSchedule.from_dict(meta["schedule"]) if meta.get("schedule") else None
    return LoadedCheckpoint(denoiser.to(map_location).eval().requires_grad_(False), schedule, meta, path)


def export_weights(src: str | Path, dst: str | Path, *, ema: bool = True) -> Path:
    """Write a sampling-only copy of a train.py checkpoint (file or run directory): the EMA (or raw, `ema=False`)
    weights and the `evodiff` metadata, without the optimizer and loop state (about a quarter of the size).
    `load_denoiser(dst, ema=ema)` and `sample.py ckpt=dst` read it; it cannot resume training."""
    path = locate_checkpoint(src)
    ckpt = read_checkpoint(path)
    state = {k: v.clone() for k, v in _weights(ckpt, path, ema).items()}
    dst = Path(dst)
    atomic_write(dst, lambda f: torch.save({"state_dict": state, CHECKPOINT_KEY: ckpt[CHECKPOINT_KEY]}, f))
    return dst


def write_schedule(schedule: EntropicSchedule, path: str | Path) -> None:
    """Write the schedule as `EntropicSchedule.save` does, atomically (readable with `EntropicSchedule.load`)."""
    atomic_write_text(path, json.dumps(schedule.to_dict(), indent=1) + "\n")


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
