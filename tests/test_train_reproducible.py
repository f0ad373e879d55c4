"""Training is a function of what it computes: with dropout on, the weights do not depend on the evaluation
settings, on a warm or cold reference-statistics cache, or on interruptions and resumes (1 or 2 processes)."""

from __future__ import annotations

import shutil

import pytest
from train_utils import (DDP, DIGITS, EVERY_STEP, GMM, assert_equal, assert_same_run, load, tiny_gmm, train_in_process,
                         train_subprocess)

EVAL = ("model.net.dropout=0.1", "evaluation.enabled=true", "evaluation.specs=[dpmpp_2m/logsnr/4]",
        "evaluation.num_samples=64", "evaluation.num_real=256", "evaluation.grid_size=0", "evaluation.batch_size=32")
"""6 steps of 64 samples with dropout and a pixel Fréchet distance of 64 samples at every validation."""


def _weights(run_dir):
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    return ckpt["state_dict"], ckpt["optimizer_states"], ckpt["evodiff"]["tracker"], ckpt["evodiff"]["schedule"]


def test_weights_do_not_depend_on_evaluation_or_the_statistics_cache(tmp_path):
    stats = f"evaluation.stats_dir={tmp_path / 'stats'}"
    cold = tmp_path / "cold"
    train_in_process(GMM, tiny_gmm(cold, *EVAL, stats, "trainer.val_every_steps=2"))
    warm = tmp_path / "warm"
    train_in_process(GMM, tiny_gmm(warm, *EVAL, stats, "trainer.val_every_steps=2"))
    rare = tmp_path / "rare"
    train_in_process(GMM, tiny_gmm(rare, *EVAL, stats, "trainer.val_every_steps=1000"))
    assert_equal(_weights(cold), _weights(warm), "cold vs warm cache")
    assert_equal(_weights(warm), _weights(rare), "val every 2 vs 1000 steps")


@pytest.mark.ddp
@pytest.mark.slow
def test_two_ranks_interrupted_and_resumed_equal_the_uninterrupted_run(tmp_path):
    """2 gloo ranks with dropout, 6 steps checkpointed after each; a run killed after step 3 (its last.ckpt: that
    run's step-3 archive) resumed with one checkpoint at the end: every piece of state the same, both ranks' RNG too."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    proc = train_subprocess(GMM, tiny_gmm(whole, "model.net.dropout=0.1", *DDP, *EVERY_STEP))
    assert proc.returncode == 0, proc.stderr[-3000:]
    (split / "checkpoints").mkdir(parents=True)
    shutil.copy(whole / "checkpoints" / "step-3.ckpt", split / "checkpoints" / "last.ckpt")
    proc = train_subprocess(GMM, tiny_gmm(split, "model.net.dropout=0.1", *DDP))
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = load(whole / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6 and len(a["evodiff"]["rng"]) == 2
    assert_same_run(a, b)


def test_digits_unet_weights_do_not_depend_on_evaluation_or_the_statistics_cache(tmp_path):
    """The digits SongUNet with dropout, 4 steps of 16 digits: cold cache and a validation after every step vs a
    warm cache and the final validation only."""
    tiny = ["model.net.model_channels=8", "model.net.channel_mult=[1]", "data.batch_size=16", "train.total_images=64",
            "logger.kind=none", "trainer.progress_bar=false", "entropic.update_every_steps=2",
            f"evaluation.stats_dir={tmp_path / 'stats'}", *EVAL]
    train_in_process(DIGITS, [f"run.dir={tmp_path / 'cold'}", *tiny, "trainer.val_every_steps=1"])
    train_in_process(DIGITS, [f"run.dir={tmp_path / 'warm'}", *tiny, "trainer.val_every_steps=1000"])
    assert_equal(_weights(tmp_path / "cold"), _weights(tmp_path / "warm"))
