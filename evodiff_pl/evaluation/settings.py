"""The options of the evaluation callback and their checks (config section `evaluation`), without Lightning, so that
train.py documents and validates them before importing it (`evodiff_pl.evaluation.callback` adds the hooks)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from evodiff_pl.sampling.generate import EvalSpec

if TYPE_CHECKING:
    from evodiff_pl.evaluation.metrics import FrechetScore


class EvaluationSettings:
    """The settings of `SampleQualityCallback`."""

    def __init__(
        self,
        specs: Sequence[EvalSpec | str | Mapping],
        num_samples: int = 2000,
        *,
        every_n_evals: int | None = None,
        every_n_images: int | None = None,
        seed: int = 0,
        feature: str = "pixels",
        weights_path: str | os.PathLike | None = None,
        stats_dir: str | os.PathLike | None = None,
        num_real: int | None = None,
        batch_size: int = 256,
        grid_size: int = 64,
        out_dir: str | os.PathLike | None = None,
        progress_every_s: float = 60.0,
        gnet: str | os.PathLike | None = None,
        tune_samples: int = 128,
        tune_evals: int = 12,
        tune_objective: str = "fd",
        tune_reference_steps: int = 40,
    ) -> None:
        """
        Args:
            specs: evaluation settings, as EvalSpec or "solver/schedule/nfe[/protocol]" strings (e.g.
                "evodiff/rescaled_entropic/10", "dpmpp_2m/logsnr/10", "heun/karras/36": heun makes
                2 NFE per step, so its NFE is even; "heun/karras/35/edm": EDM's generate.py protocol;
                "heun/karras/35/edm/guidance=1.5/class=3": guided, every sample of class 3).
            num_samples: generated samples per spec and evaluation, over all ranks.
            every_n_evals: evaluate at every n-th validation epoch (sanity check excluded).
            every_n_images: evaluate at the first validation after each multiple of n training images
                (`pl_module.images_seen`); exclusive with every_n_evals. Neither: every validation. The validation
                at the end of training is always scored.
            seed: base seed of the generated samples (sample j uses seed + j) and of the grids.
            feature: "pixels" (Fréchet distance on pixels / raw vectors, offline) or "inception" (FID).
            weights_path: local InceptionV3 weights for feature="inception" (needed offline).
            stats_dir: cache of reference statistics; default ~/.cache/evodiff-pl/stats.
            num_real: reference samples used; None = the whole `real_images()`.
            batch_size: samples per denoiser call on each rank.
            grid_size: images in each spec's sample grid; 0 disables the grids.
            out_dir: the grids go to out_dir/grids; default the trainer's default_root_dir.
            progress_every_s: rank 0 reports the evaluation's progress (samples, img/s, ETA) at most this often.
            gnet: the guiding network of the specs with guidance (a run directory, .ckpt or NVlabs pickle; its EMA
                weights); None: such specs use classifier-free guidance with the null label.
            tune_samples: specs on the schedule `tuned` have their grid tuned before each evaluation
                (`evodiff_pl.sampling.grid_tuning.tune_grids`, warm-started from the last one, first from the
                learned rescaled entropic grid, kept in `pl_module.tuned_grids`) from the starting noises of seeds
                TUNE_SEED + j, j < tune_samples (never scored).
            tune_evals: at most this many solver runs per tuned grid and evaluation.
            tune_objective: what the tuning minimises (`evodiff_pl.tuning.OBJECTIVES`): fd (to an iPNDM reference
                solution), rmse, slack, or fd_data (this score itself, against its reference statistics).
            tune_reference_steps: log-SNR steps of the iPNDM reference solution (not used by fd_data).
        """
        super().__init__()
        self.specs = [EvalSpec.parse(s) for s in specs]
        if not self.specs:
            raise ValueError("specs is empty: give at least one 'solver/schedule/nfe'")
        names = [s.name for s in self.specs]
        if len(set(names)) != len(names):
            raise ValueError(f"duplicate specs: {names}")
        if every_n_evals is not None and every_n_images is not None:
            raise ValueError("set every_n_evals or every_n_images, not both")
        for key, value in (("every_n_evals", every_n_evals), ("every_n_images", every_n_images)):
            if value is not None and value < 1:
                raise ValueError(f"{key} must be >= 1, got {value}")
        if num_samples < 2 or batch_size < 1 or grid_size < 0:
            raise ValueError(f"need num_samples >= 2, batch_size >= 1, grid_size >= 0; got {num_samples}, "
                             f"{batch_size}, {grid_size}")
        self.num_samples = num_samples
        self.every_n_evals = every_n_evals
        self.every_n_images = every_n_images
        self.seed = seed
        self.feature = feature
        self.stats_dir = stats_dir
        self.num_real = num_real
        self.batch_size = batch_size
        self.grid_size = grid_size
        self.out_dir = out_dir
        self.progress_every_s = progress_every_s
        from evodiff_pl.tuning import OBJECTIVES

        if tune_samples < 2 or tune_evals < 1 or tune_reference_steps < 2:
            raise ValueError(f"need tune_samples >= 2, tune_evals >= 1, tune_reference_steps >= 2; got "
                             f"{tune_samples}, {tune_evals}, {tune_reference_steps}")
        if tune_objective not in OBJECTIVES:
            raise ValueError(f"unknown tune_objective {tune_objective!r}; valid: {', '.join(OBJECTIVES)}")
        self.tune = dict(objective=tune_objective, max_evals=tune_evals, reference_steps=tune_reference_steps)
        self.tune_samples = tune_samples
        from evodiff_pl.evaluation.metrics import build_extractor  # torchmetrics: only when evaluating
        from evodiff_pl.io.denoiser import load_denoiser

        # Build (and so check) the Inception weights now, not after the first training epoch.
        self._extractor = build_extractor(feature, weights_path=weights_path) if feature != "pixels" else None
        self._gnet = load_denoiser(gnet) if gnet is not None else None
        self.score: FrechetScore | None = None
        self._evals = 0
        self._last_bucket = 0
        self.pending = False
        """An evaluation is under way (or was abandoned by a stop signal: the checkpoint records it for the rerun)."""
