"""One entry point for every network file this package samples from: a train.py checkpoint or run directory,
an exported checkpoint, or an NVlabs edm/edm2 pickle."""

from __future__ import annotations

from pathlib import Path

import torch

from evodiff_pl.io.checkpointing import CheckpointError, LoadedCheckpoint, load_run_denoiser
from evodiff_pl.io.nvlabs import load_nvlabs_pickle
from evodiff_pl.utils.downloads import DownloadError, cached_download, is_url


def local_file(path: str | Path) -> str | Path:
    """`path`, or for an http(s) URL its copy in the download cache (fetched the first time; CheckpointError, one
    line, when it cannot be)."""
    if not is_url(path):
        return path
    try:
        return cached_download(str(path))
    except DownloadError as err:
        raise CheckpointError(str(err)) from None


def load_denoiser(path: str | Path, *, ema: bool = True, map_location: str | torch.device = "cpu") -> LoadedCheckpoint:
    """The denoiser, its learned schedule and metadata of a train.py checkpoint (file or run directory; `ema`: the
    EMA or the raw weights) or of an NVlabs pickle (`.pkl`, `evodiff_pl.io.nvlabs`), for sampling; either may be an
    http(s) URL (downloaded once, `local_file`)."""
    path = local_file(path)
    if Path(path).suffix == ".pkl":
        return load_nvlabs_pickle(path, map_location=map_location)
    return load_run_denoiser(path, ema=ema, map_location=map_location)
