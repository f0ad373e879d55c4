"""Checkpoints: exact resume, discovery of the newest one, refusal of corrupt or mismatched files, sample.py loading."""

from __future__ import annotations

import shutil

import pytest
import torch
from train_utils import EVERY_STEP, GMM, assert_equal, assert_same_run, load, tiny_gmm, train_in_process

from evodiff_pl.io.checkpointing import CheckpointError, export_weights, newest_checkpoint
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.io.export import main as export_main
from evodiff_pl.schedules.entropic import EntropicSchedule

RESUME = ("model.net.dropout=0.1",)
"""Dropout on, so the dropout stream matters; 6 steps of 64 samples, the schedule rebuilt every 2 steps."""
@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An uninterrupted 6-step run (one checkpoint, at the end), the same run checkpointed after every step, and a
    run killed after step 3 (its last.ckpt: the every-step run's step-3 archive) resumed by rerunning the command."""
    full = tmp_path_factory.mktemp("full")
    train_in_process(GMM, tiny_gmm(full, *RESUME))
    every = tmp_path_factory.mktemp("every")
    train_in_process(GMM, tiny_gmm(every, *RESUME, *EVERY_STEP))
    split = tmp_path_factory.mktemp("split")
    (split / "checkpoints").mkdir()
    shutil.copy(every / "checkpoints" / "step-3.ckpt", split / "checkpoints" / "last.ckpt")
    first_half = load(split / "checkpoints" / "last.ckpt")
    resumed = train_in_process(GMM, tiny_gmm(split, *RESUME))
    return full, split, first_half, resumed, every


def test_resume_is_exact(runs):
    full, split, first_half, resumed, every = runs
    assert resumed.ckpt_path == split / "checkpoints" / "last.ckpt"
    assert first_half["global_step"] == 3 and first_half["evodiff"]["tracker"]["pending_steps"] == 1
    a, b = load(full / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert a["global_step"] == b["global_step"] == 6
    assert_same_run(a, b)
    assert a["evodiff"]["images_seen"] == 384 and a["evodiff"]["schedule"] is not None
    assert (full / "schedule.json").read_bytes() == (split / "schedule.json").read_bytes()
    assert not torch.equal(first_half["state_dict"]["net.backbone.inp.weight"], a["state_dict"]["net.backbone.inp.weight"])


def test_checkpoint_frequency_changes_nothing(runs):
    full, *_, every = runs
    assert_same_run(load(full / "checkpoints" / "last.ckpt"), load(every / "checkpoints" / "last.ckpt"))


def test_checkpoint_holds_config_and_loads_for_sampling(runs):
    full, *_ = runs
    ckpt = load(full / "checkpoints" / "last.ckpt")
    meta = ckpt["evodiff"]
    assert meta["config"]["model"]["net"]["hidden"] == 16 and meta["network"]["kwargs"]["dim"] == 8
    assert (full / "config.yaml").read_text().count("hidden: 16") == 1
    loaded = load_denoiser(full)  # a run directory, as sample.py gets it
    ema = {k[4:]: v for k, v in ckpt["state_dict"].items() if k.startswith("ema.")}
    assert_equal(loaded.denoiser.state_dict(), ema)
    assert loaded.schedule.to_dict() == EntropicSchedule.load(full / "schedule.json").to_dict() == meta["schedule"]
    x = torch.randn(4, 8)
    assert loaded.denoiser(x, torch.full((4,), 1.0)).shape == (4, 8)
    raw = load_denoiser(full / "checkpoints" / "last.ckpt", ema=False)
    assert torch.equal(raw.denoiser.backbone.inp.weight, ckpt["state_dict"]["net.backbone.inp.weight"])


def test_exported_weights_sample_like_the_checkpoint(runs, tmp_path):
    full, *_ = runs
    out = export_weights(full, tmp_path / "ema.ckpt")
    assert out.stat().st_size < (full / "checkpoints" / "last.ckpt").stat().st_size / 2
    a, b = load_denoiser(full), load_denoiser(out)
    assert_equal(a.denoiser.state_dict(), b.denoiser.state_dict())
    assert a.schedule.to_dict() == b.schedule.to_dict() and a.meta["network"] == b.meta["network"]
    with pytest.raises(CheckpointError, match="holds no 'net.' weights.*ema=True"):
        load_denoiser(out, ema=False)
    raw = load_denoiser(export_weights(full, tmp_path / "raw.ckpt", ema=False), ema=False)
    assert_equal(raw.denoiser.state_dict(), load_denoiser(full, ema=False).denoiser.state_dict())


def test_export_command_writes_the_copy_and_refuses_a_missing_source_in_one_line(runs, tmp_path, capsys):
    full, *_ = runs
    assert export_main([str(full), str(tmp_path / "raw.ckpt"), "--raw"]) == 0
    assert_equal(load_denoiser(tmp_path / "raw.ckpt", ema=False).denoiser.state_dict(),
                 load_denoiser(full, ema=False).denoiser.state_dict())
    assert export_main([str(tmp_path / "missing"), str(tmp_path / "x.ckpt")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: checkpoint") and "does not exist" in err


def test_newest_of_last_and_hpc_checkpoint(runs, tmp_path):
    full, split, first_half, *_ = runs
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    shutil.copy(full / "checkpoints" / "last.ckpt", folder / "last.ckpt")  # step 6
    torch.save(first_half, folder / "hpc_ckpt_1.ckpt")  # step 3
    assert newest_checkpoint(folder) == folder / "last.ckpt"
    newer = dict(first_half, global_step=9)
    torch.save(newer, folder / "hpc_ckpt_2.ckpt")
    assert newest_checkpoint(folder) == folder / "hpc_ckpt_2.ckpt"


def test_corrupt_checkpoint_stops_and_is_left_untouched(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    garbage = b"\x00garbage, not a checkpoint\xff" * 50
    last.write_bytes(garbage)
    before = last.stat().st_mtime_ns
    with pytest.raises(CheckpointError, match=rf"checkpoint {last} is unreadable"):
        train_in_process(GMM, tiny_gmm(run_dir, *RESUME, "train.total_images=640"))
    assert last.read_bytes() == garbage and last.stat().st_mtime_ns == before


def test_truncated_checkpoint_is_refused(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    last = run_dir / "checkpoints" / "last.ckpt"
    data = last.read_bytes()
    last.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="unreadable"):
        train_in_process(GMM, tiny_gmm(run_dir, *RESUME))
    assert len(last.read_bytes()) == len(data) // 2


def test_mismatched_checkpoint_names_the_difference(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs[0], run_dir)
    with pytest.raises(CheckpointError, match=r"model\.net\.hidden: checkpoint 16, config 24"):
        train_in_process(GMM, tiny_gmm(run_dir, *RESUME, "model.net.hidden=24"))
    with pytest.raises(CheckpointError, match=r"data\.dim: checkpoint 8, config 4"):
        train_in_process(GMM, tiny_gmm(run_dir, *RESUME, "data.dim=4"))


def test_resume_never_refuses_an_existing_run(runs):
    with pytest.raises(CheckpointError, match="run.resume=never but .*last.ckpt exists"):
        train_in_process(GMM, tiny_gmm(runs[0], *RESUME, "run.resume=never"))


def test_checkpoint_from_before_the_loss_scale_resumes_with_scaled_moments(tmp_path):
    """A checkpoint of the per-element-mean loss (no `loss_scale` entry) resumes as one of EDM's summed loss: Adam's
    moments are scaled by n and n² (n = 8 elements here, exact in binary), so the steps after it are the same."""
    from evodiff_pl.io.checkpointing import read_checkpoint, write_checkpoint

    full, split = tmp_path / "full", tmp_path / "split"
    train_in_process(GMM, tiny_gmm(full, *RESUME))
    train_in_process(GMM, tiny_gmm(split, *RESUME, "train.total_images=192"))  # 3 steps, then 6 (weights: exact)
    old = read_checkpoint(split / "checkpoints" / "last.ckpt")
    assert old["evodiff"].pop("loss_scale") == "sum_over_elements"
    for moments in old["optimizer_states"][0]["state"].values():
        moments["exp_avg"].div_(8)
        moments["exp_avg_sq"].div_(64)
    write_checkpoint(tmp_path / "old.ckpt", old)
    train_in_process(GMM, tiny_gmm(split, *RESUME, f"run.resume={tmp_path / 'old.ckpt'}"))
    a, b = load(full / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert b["global_step"] == 6 and b["evodiff"]["loss_scale"] == "sum_over_elements"
    assert_equal(a["state_dict"], b["state_dict"], "state_dict")
    assert_equal(a["optimizer_states"], b["optimizer_states"], "optimizer")
