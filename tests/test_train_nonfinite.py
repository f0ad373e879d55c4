"""Non-finite losses: the step is skipped and reported; too many in a row stop the run with a checkpoint."""

from __future__ import annotations

import pytest
import torch
from train_utils import GMM, load, tiny_gmm, train_in_process

from evodiff_pl.training.nonfinite import NonFiniteTrainingError


def test_nan_step_is_skipped_and_reported(tmp_path):
    with pytest.warns(UserWarning, match=r"step 2 \(batch 2\): non-finite training step skipped \(64 non-finite") as rec:
        run = train_in_process(GMM, tiny_gmm(tmp_path, "train.nan_loss_steps=[2]"))
    message = next(str(w.message) for w in rec if "non-finite" in str(w.message))
    assert "no optimizer, EMA or tracker update" in message and "Sigmas of the batch: [" in message
    module = run.module
    assert module.global_step == 6 and module.batches_seen == 7  # the skipped batch is consumed, not applied
    assert module.images_seen == 7 * 64 and module.nonfinite_streak == 0
    assert module.tracker.steps == 6  # updated by the 6 applied steps only
    assert all(torch.isfinite(p).all() for p in module.net.parameters())
    assert all(torch.isfinite(p).all() for p in module.ema.parameters())


def test_consecutive_nonfinite_steps_stop_with_checkpoint(tmp_path):
    overrides = tiny_gmm(tmp_path, "train.nan_loss_steps=[1,2,3,4]", "train.max_nonfinite_steps=2")
    with pytest.warns(UserWarning, match="non-finite"), pytest.raises(NonFiniteTrainingError) as err:
        train_in_process(GMM, overrides)
    ckpt = tmp_path / "checkpoints" / "nonfinite-step1.ckpt"
    msg = str(err.value)
    assert "3 consecutive training steps had a non-finite loss or gradient" in msg
    assert "train.max_nonfinite_steps=2" in msg and str(ckpt) in msg
    saved = load(ckpt)
    assert saved["global_step"] == 1 and saved["evodiff"]["batches_seen"] == 4
    assert all(torch.isfinite(v).all() for v in saved["state_dict"].values() if v.is_floating_point())
    assert not (tmp_path / "checkpoints" / "last.ckpt").exists()


def test_main_reports_the_stop_in_one_line(tmp_path, capsys):
    from evodiff_pl.training.cli import main

    overrides = tiny_gmm(tmp_path, "train.nan_loss_steps=[0,1]", "train.max_nonfinite_steps=1")
    with pytest.warns(UserWarning, match="non-finite"):
        assert main(["--config", str(GMM), *overrides]) == 1
    assert capsys.readouterr().err.startswith("error: 2 consecutive training steps had a non-finite loss")
