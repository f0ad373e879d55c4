"""Which checkpoint a run resumes from and what may change on resume (`resume_checkpoint`), without Lightning.

`evodiff_pl.training.resume` re-exports these; train.py's command line reads them to skip a finished run in well
under a second (`evodiff_pl.training.cli`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from omegaconf import OmegaConf

from evodiff_pl.config.schema import Config
from evodiff_pl.io.checkpointing import (
    CHECKPOINT_KEY, VERSION, CheckpointError, checkpoint_candidates, newest_checkpoint, read_checkpoint,
    write_checkpoint,
)

IGNORED = ("run.dir", "run.resume", "run.name", "checkpoint", "logger", "evaluation", "entropic.plot_nfe",
           "trainer.progress_bar", "trainer.val_every_steps", "data.root", "data.download", "data.pin_memory",
           "data.prepare_per_node", "model.init")
"""Config entries that do not change what a run computes: free to change on resume, not recorded."""
RECORDED = ("data.batch_size", "data.batch_gpu", "data.num_workers", "optim.lr", "optim.lr_rampup_images", "optim.ref_images",
            "ema.halflife_images", "ema.rampup_ratio", "ema.snapshot_every_images", "train",
            "entropic.update_every_steps", "trainer", "perf")
"""Entries that may change on resume; each change is recorded in the checkpoints (`config_history`) with the step
from which it applies. Every other entry (model, data, loss, run.seed, optim.betas/eps/schedule, ema.kind/stds, the
tracker) must match."""
ARCHIVE_PATTERN = re.compile(r"step-(\d+)\.ckpt")
_UNSET = "<unset>"


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
