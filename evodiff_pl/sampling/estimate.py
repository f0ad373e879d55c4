"""The dedicated entropic-time estimation pass of sample.py (`estimate_schedule=true`)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch

from evodiff_pl.data.stream import DiffusionDataModule
from evodiff_pl.utils.dist import world
from evodiff_pl.schedules.entropic import EntropicSchedule, Samples, estimate_mmse
from evodiff_pl.sampling.job import SamplingJob, checkpoint_data


def training_samples(data: DiffusionDataModule, labels: bool = False) -> Callable[[int, torch.Generator], Samples]:
    """A sampler `draw(n, generator)` of un-augmented training samples (float, images in [-1, 1]) for
    `estimate_mmse`: a random permutation of the dataset, repeated if n exceeds it; with `labels`, (samples,
    their class labels) for a class-conditional denoiser."""
    view = data.view()

    def draw(n: int, generator: torch.Generator) -> Samples:
        order = torch.randperm(len(view), generator=generator).repeat(math.ceil(n / len(view)))[:n]
        items = [view[i] for i in order.tolist()]
        x = torch.stack([item[0] for item in items])
        return (x, torch.as_tensor([int(item[1]) for item in items], dtype=torch.int64)) if labels else x

    return draw


def estimated_schedule_path(ckpt: Path, outdir: str | None = None) -> Path:
    """<outdir or the checkpoint's folder>/<checkpoint stem>_schedule_estimated.json."""
    name = f"{ckpt.stem}_schedule_estimated.json"
    return Path(outdir) / name if outdir is not None else ckpt.with_name(name)


def estimate(job: SamplingJob) -> Path:
    """The dedicated estimation pass (levels x pairs, over all ranks) on the checkpoint's denoiser and dataset;
    rank 0 writes the schedule atomically into outdir, or beside the checkpoint. Returns its path."""
    cfg, loaded, meta = job.cfg, job.loaded, job.loaded.meta
    sigmas, mmse = estimate_mmse(
        loaded.denoiser, training_samples(checkpoint_data(loaded, cfg.data), labels=bool(meta["num_classes"])),
        n_levels=cfg.levels, n_pairs=cfg.pairs,
        sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"], batch_size=cfg.batch, device=job.device,
        progress=cfg.progress,
    )
    source = {"checkpoint": str(loaded.path), "global_step": meta.get("global_step"), "ema": cfg.ema,
              "n_pairs": cfg.pairs}
    kind = meta["config"]["entropic"]["kind"] if meta.get("config") else "rescaled_entropic"
    schedule = EntropicSchedule.from_mmse(sigmas, mmse, kind=kind,
                                          dim=math.prod(meta["sample_shape"]), sigma_data=meta["sigma_data"],
                                          source=source)
    path = estimated_schedule_path(loaded.path, cfg.outdir)
    if world()[0] == 0:
        schedule.save(path)
        print(f"estimated {schedule.kind} schedule ({cfg.levels} levels x {cfg.pairs} pairs) -> {path}", flush=True)
    return path
