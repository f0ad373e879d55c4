"""The schedule learned while training the MLP on the 64-d mixture approaches the exact rescaled entropic schedule."""

from __future__ import annotations

import torch
from train_utils import GMM, train_in_process

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules.grids import karras
from evodiff_pl.toy import GaussianMixture


def test_learned_schedule_matches_the_exact_one(tmp_path):
    """configs/gmm.yaml as shipped (500 steps of 512 samples, ~40 s on 2 idle cores), NFE 10, within 0.15 in ln σ."""
    run = train_in_process(GMM, [f"run.dir={tmp_path}", "logger.kind=none", "evaluation.enabled=false",
                                 "trainer.progress_bar=false"])
    cfg = run.module.meta["config"]["data"]
    mixture = GaussianMixture.default(dim=cfg["dim"], n_components=cfg["n_components"], seed=cfg["mixture_seed"])
    levels = karras(255, 0.002, 80.0)
    mmse = mixture.mmse(levels, n_mc=4096, generator=torch.Generator().manual_seed(1))
    exact = EntropicSchedule.from_mmse(levels, mmse, kind="rescaled_entropic").sigmas(10, 0.002, 80.0)
    learned = run.module.entropic_schedule.sigmas(10, 0.002, 80.0)
    assert run.module.entropic_schedule.kind == "rescaled_entropic"
    error = (learned.log() - exact.log()).abs().max().item()
    assert error < 0.15, f"learned {learned.tolist()} vs exact {exact.tolist()}: max |Δ ln σ| = {error:.3f}"
    saved = EntropicSchedule.load(tmp_path / "schedule.json").sigmas(10, 0.002, 80.0)
    assert torch.equal(saved, learned)
