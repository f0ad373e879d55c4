"""The checkpoint format, and reading it for sampling: locate, validate, load a denoiser, export its weights.

Format (a Lightning checkpoint, loadable with `torch.load(..., weights_only=True)`):
- `state_dict`: `net.*` the trained EDMPrecond (backbone under `net.backbone.*`), `ema.*` its EMA copy;
- `optimizer_states`, `loops`, `callbacks`, `global_step`, ...: Lightning's training state;
- `evodiff` (`CHECKPOINT_KEY`): `format`, `version`, `config` (the resolved config), `network`
  (`name`, `kwargs`: everything `evodiff_pl.networks.build_network` needs), `sigma_data`, `sigma_min`,
  `sigma_max`, `sample_shape`, `num_classes`, `data` (`name`, `stats_key`), `images_seen`,
  `batches_seen`, `global_step`, `tracker`, `schedule` (`EntropicSchedule.to_dict()` or None), `rng`.
`load_denoiser` rebuilds the (EMA) denoiser and its schedule from this without Lightning or the training
code; the training side (resume rules, the Lightning plugin and callback) is `evodiff_pl.resume`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evodiff_pl.entropic import EntropicSchedule
from evodiff_pl.fileio import atomic_write
from evodiff_pl.networks import build_network
from evodiff_pl.precond import EDMPrecond

CHECKPOINT_KEY = "evodiff"
FORMAT = "evodiff-pl/checkpoint"
VERSION = 1
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, not ours, or made for another model or dataset."""


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
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this code reads {VERSION}")
    return ckpt


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


@dataclass
class LoadedCheckpoint:
    """A denoiser rebuilt from a checkpoint, with its learned schedule and metadata."""

    denoiser: EDMPrecond
    """EDMPrecond in eval mode with the EMA (default) or raw weights."""
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
    """Rebuild the denoiser of a train.py checkpoint (file or run directory) for sampling; no Lightning module needed."""
    path = locate_checkpoint(path)
    ckpt = read_checkpoint(path)
    meta = ckpt[CHECKPOINT_KEY]
    net = meta["network"]
    denoiser = EDMPrecond(build_network(net["name"], **net["kwargs"]), sigma_data=meta["sigma_data"])
    prefix = _prefix(ema)
    state = {k[len(prefix):]: v for k, v in _weights(ckpt, path, ema).items()}
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
