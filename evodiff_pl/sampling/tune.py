"""sample.py's schedule=tuned: the grids tuned for each solver x NFE of the sweep, read or made (`tune=true`)."""

from __future__ import annotations

import time

import torch

from evodiff_pl.evaluation.kid import KIDScore
from evodiff_pl.evaluation.metrics import FrechetScore
from evodiff_pl.io.checkpointing import LoadedCheckpoint
from evodiff_pl.sampling.generate import steps_for_nfe
from evodiff_pl.sampling.options import SampleConfig, SampleError, check_choice, names, nfes
from evodiff_pl.sampling.plan import learned_schedule
from evodiff_pl.schedules.grids import SCHEDULES, get_sigmas
from evodiff_pl.sampling.grid_tuning import learned_start, tune_grids, tuning_noise
from evodiff_pl.schedules.tuned import KIND, TunedGrids, tuned_grids_path
from evodiff_pl.solvers import SOLVERS
from evodiff_pl.tuning import OBJECTIVES
from evodiff_pl.utils.dist import world


def stored_grids(cfg: SampleConfig, loaded: LoadedCheckpoint) -> TunedGrids | None:
    """The grids of `tuned_grids_path` (outdir, then beside the checkpoint), else the checkpoint's, else None."""
    for path in dict.fromkeys([tuned_grids_path(loaded.path, cfg.outdir), tuned_grids_path(loaded.path)]):
        if path.is_file():
            try:
                return TunedGrids.load(path)
            except ValueError as err:
                raise SampleError(f"tuned grids file: {err}") from None
    return TunedGrids.from_dict(loaded.meta["tuned"]) if loaded.meta.get("tuned") else None


def check_tuning(cfg: SampleConfig) -> bool:
    """Whether the sweep asks for schedule=tuned, after checking the tuning options (cheap: before any score or
    sampling is prepared)."""
    schedules = names("schedule", cfg.schedule, list(SCHEDULES))
    if KIND not in schedules:
        if cfg.tune:
            raise SampleError("tune=true tunes the grids of schedule=tuned: add tuned to schedule=")
        return False
    if cfg.protocol != "default":
        raise SampleError(f"schedule=tuned needs protocol=default, got protocol={cfg.protocol}")
    check_choice("tune_objective", cfg.tune_objective, OBJECTIVES)
    if cfg.tune_samples < 2 or cfg.tune_evals < 1:
        raise SampleError(f"need tune_samples >= 2 and tune_evals >= 1, got {cfg.tune_samples}, {cfg.tune_evals}")
    return True


def tuned_grids(cfg: SampleConfig, loaded: LoadedCheckpoint, device: torch.device,
                score: FrechetScore | None = None) -> TunedGrids | None:
    """The tuned grids of every valid solver x NFE of a sweep that `check_tuning` accepted: stored ones, the missing
    (or with tune=true all) tuned now from the learned rescaled entropic grid (karras where the checkpoint has no
    learned schedule) and written by rank 0 to `tuned_grids_path`. tune_objective=fd_data tunes against `score`'s
    reference statistics (a Fréchet score of the samples the network makes)."""
    wanted = []
    for solver in names("solver", cfg.solver, list(SOLVERS)):
        for count in nfes(cfg.nfe):
            try:
                steps_for_nfe(solver, count)
                wanted.append((solver, count))
            except ValueError:  # plan() reports it as an invalid row
                continue
    have = stored_grids(cfg, loaded)
    todo = wanted if cfg.tune else [w for w in wanted if have is None or have.get(*w) is None]
    if not todo:
        return have
    if cfg.tune_objective == "fd_data" and (score is None or isinstance(score, KIDScore)):
        raise SampleError("tune_objective=fd_data tunes against the reference statistics of a Fréchet score of the "
                          "network's own samples: give score=fd_pixels, fid_inception or fd_dinov2 (not KID, not "
                          "with vae=), or another tune_objective")
    meta, learned = loaded.meta, learned_schedule(cfg, loaded)
    lo, hi = meta["sigma_min"], meta["sigma_max"]
    start = learned_start(learned, lo, hi) if learned is not None \
        else (lambda solver, count: get_sigmas("karras", steps_for_nfe(solver, count), lo, hi))
    x_T, labels = tuning_noise(cfg.tune_samples, tuple(meta["sample_shape"]), hi, meta["num_classes"], device)
    t0 = time.perf_counter()
    data = score.moments() if cfg.tune_objective == "fd_data" else None
    grids = tune_grids(todo, loaded.denoiser, x_T, start, labels=labels, previous=have, objective=cfg.tune_objective,
                       max_evals=cfg.tune_evals, data=data, source={"checkpoint": str(loaded.path)})
    path = tuned_grids_path(loaded.path, cfg.outdir)
    if world()[0] == 0:
        grids.save(path)
        print(f"tuned {', '.join(f'{s}/{n}' for s, n in todo)} from the "
              f"{'learned rescaled entropic' if learned is not None else 'karras'} grid "
              f"({time.perf_counter() - t0:.0f} s) -> {path}", flush=True)
    return grids
