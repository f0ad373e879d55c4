"""Noise-level grids: the fixed families and the registry (`grids`), the per-σ loss tracker (`tracker`), entropic
time built from it (`entropic`) or from an EDM2 head (`head`)."""

from evodiff_pl.schedules.grids import SCHEDULES, get_sigmas, karras, logsnr

__all__ = ["SCHEDULES", "get_sigmas", "karras", "logsnr"]
