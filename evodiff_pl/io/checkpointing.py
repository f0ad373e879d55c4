"""The checkpoint format, and reading it for sampling: locate, validate, load a denoiser, export its weights.

Format (a Lightning checkpoint, loadable with `torch.load(..., weights_only=True)`):
- `state_dict`: `net.*` the trained EDMPrecond (backbone under `net.backbone.*`), `ema.*` its EMA copy;
- `optimizer_states`, `loops`, `callbacks`, `global_step`, ...: Lightning's training state;
- `evodiff` (`CHECKPOINT_KEY`): `format`, `version`, `config` (the resolved config), `network`
  (`name`, `kwargs`: everything `evodiff_pl.networks.build_network` needs), `precond` (`name`, `kwargs` of
  `evodiff_pl.networks.precond.build_precond`; absent before version 2: EDM with `sigma_data`), `sigma_data`, `sigma_min`,
  `sigma_max`, `sample_shape`, `num_classes`, `data` (`name`, `stats_key`), `images_seen`,
  `batches_seen`, `global_step`, `tracker`, `schedule` (`EntropicSchedule.to_dict()` or None), `rng`,
  `config_history` (settings changed on resume, with the step), `completed` (the final evaluation ran),
  `loss_scale` ("sum_over_elements": Adam's moments are of EDM's summed loss; absent in older files, whose
  moments are rescaled on resume, `EDMModule.on_load_checkpoint`), and
  `digest`: a BLAKE2b hash of everything else in the file (every tensor's bytes, every other value's repr),
  checked on every load, so a damaged file is refused instead of resumed.
Version 2: the U-Nets have NVlabs edm's parameter layout and the file carries its digest; version 1 files (the
older SongUNet layout, no digest) are mapped on load (`networks.songunet.upgrade_v1_songunet`) and can be sampled
from, not resumed. NVlabs pickles (`.pkl`) are read by `evodiff_pl.io.nvlabs`.
`load_run_denoiser` rebuilds the (EMA) denoiser and its schedule from this without Lightning or the training
code; the training side (resume rules, the Lightning plugin and callback) is `evodiff_pl.training.resume`.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.utils.fileio import atomic_write
from evodiff_pl.networks import build_network
from evodiff_pl.networks.songunet import upgrade_v1_songunet
from evodiff_pl.networks.precond import Precond, build_precond

CHECKPOINT_KEY = "evodiff"
FORMAT = "evodiff-pl/checkpoint"
VERSION = 2
READABLE_VERSIONS = (1, 2)
HPC_PATTERN = re.compile(r"hpc_ckpt_(\d+)\.ckpt")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be used: unreadable, not ours, or made for another model or dataset."""


def _feed(h: Any, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            h.update(repr(k).encode())
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"{type(obj).__name__}{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def content_digest(obj: Any) -> str:
    """BLAKE2b of nested dicts, lists and tensors (every tensor's bytes, every other value's repr)."""
    h = hashlib.blake2b(digest_size=20)
    _feed(h, obj)
    return h.hexdigest()


def digest(ckpt: dict[str, Any]) -> str:
    """BLAKE2b of a checkpoint's content without its own `digest` entry."""
    meta = ckpt[CHECKPOINT_KEY]
    stored = meta.pop("digest", None)
    try:
        return content_digest(ckpt)
    finally:
        if stored is not None:
            meta["digest"] = stored


def write_checkpoint(path: str | Path, ckpt: dict[str, Any]) -> None:
    """Stamp the checkpoint with its `digest` and write it atomically."""
    meta = ckpt[CHECKPOINT_KEY]
    meta.pop("digest", None)
    meta["digest"] = digest(ckpt)
    atomic_write(path, lambda f: torch.save(ckpt, f))


def _unusable(path: Path, why: str) -> CheckpointError:
    return CheckpointError(
        f"checkpoint {path} is {why}. It was left untouched; to continue from another checkpoint of the run, "
        f"pass run.resume=PATH (e.g. a checkpoints/step-N.ckpt archive), or start a new run in another run.dir"
    )


def read_checkpoint(path: str | Path, *, verify: bool = True) -> dict[str, Any]:
    """Load a checkpoint on the CPU (memory-mapped, weights only) and check its digest (`verify`);
    CheckpointError naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:
        raise _unusable(path, f"unreadable (truncated or corrupt?): {type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else ''}") from None
    meta = ckpt.get(CHECKPOINT_KEY) if isinstance(ckpt, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} was not written by evodiff-pl's train.py (no {CHECKPOINT_KEY!r} entry)")
    if meta.get("version") not in READABLE_VERSIONS:
        raise CheckpointError(f"checkpoint {path} has format version {meta.get('version')!r}; this code reads "
                              f"{', '.join(map(str, READABLE_VERSIONS))}")
    if verify and meta["version"] >= 2 and meta.get("digest") != digest(ckpt):
        raise _unusable(path, "damaged: its content does not match the digest stored in it")
    return ckpt


def _stored_step(path: Path) -> int:
    return int(read_checkpoint(path, verify=False)["global_step"])


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


def load_run_denoiser(path: str | Path, *, ema: bool = True,
                      map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """Rebuild the denoiser of a train.py checkpoint (file or run directory) for sampling; no Lightning needed."""
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
    `load_denoiser(dst, ema=ema)` (`evodiff_pl.io.denoiser`) and `sample.py ckpt=dst` read it; it cannot resume training."""
    path = locate_checkpoint(src)
    ckpt = read_checkpoint(path)
    state = {k: v.clone() for k, v in _weights(ckpt, path, ema).items()}
    dst = Path(dst)
    write_checkpoint(dst, {"state_dict": state, CHECKPOINT_KEY: dict(ckpt[CHECKPOINT_KEY])})
    return dst
