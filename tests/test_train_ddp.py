"""`python train.py` on 2 CPU processes (DDP, gloo) gives the 1-process answer for the same global batch.

Run in float64 (trainer.precision=64-true) the design is exact up to summation order, dropout included (a sample's
masks follow its global position): tracker to 1e-10 relative, weights, EMA and Adam moments to 1e-10. In float32
the two runs differ by rounding (the gradient all-reduce sums in another order), checked at 1e-5 (slow).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from train_utils import DDP, DIGITS_EDM2, GMM, load, tiny_digits_edm2, tiny_gmm, train_subprocess

pytestmark = pytest.mark.ddp


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-300)).item()


def _compare(tmp_path, precision: str, tol_tracker: float, tol_weights: float, *more: str, config: Path = GMM,
             tiny: Callable[..., list[str]] = tiny_gmm) -> None:
    """8 steps of 128 samples, `python train.py --config config tiny(...)` on 1 and on 2 processes."""
    overrides = ("data.batch_size=128", "train.total_images=1024", f"trainer.precision={precision}", *more)
    ckpts = []
    for name, extra in (("one", ()), ("two", DDP)):
        proc = train_subprocess(config, tiny(tmp_path / name, *overrides, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpts.append(load(tmp_path / name / "checkpoints" / "last.ckpt"))
    one, two = ckpts
    assert one["global_step"] == two["global_step"] == 8
    e1, e2 = one["evodiff"], two["evodiff"]
    assert e1["images_seen"] == e2["images_seen"] == 1024 and e1["tracker"]["steps"] == e2["tracker"]["steps"] == 8
    assert len(e1["rng"]) == 1 and len(e2["rng"]) == 2
    for key in ("sum", "count"):  # decayed (entropic.ema_decay) float64 sums
        assert _rel(e1["tracker"][key], e2["tracker"][key]) < tol_tracker, key
    if e1["schedule"] is None or e2["schedule"] is None:  # too few tracked samples yet (the EDM2 U-Net's 8 steps)
        assert e1["schedule"] is e2["schedule"] is None
    else:
        assert e1["schedule"]["log_sigma"] == pytest.approx(e2["schedule"]["log_sigma"], rel=tol_tracker)
    for key, value in one["state_dict"].items():
        assert _rel(value, two["state_dict"][key]) < tol_weights, key
    s1, s2 = one["optimizer_states"][0]["state"], two["optimizer_states"][0]["state"]
    for i in s1:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert _rel(s1[i][moment], s2[i][moment]) < tol_weights, (i, moment)


def test_two_processes_match_one_in_float64(tmp_path):
    """Dropout (masks by global position), and entropic.source=ema_eval on 95 of 128 global positions: 48 on rank 0
    and 47 on rank 1, the same samples."""
    _compare(tmp_path, "64-true", 1e-10, 1e-10, "model.net.dropout=0.2", "entropic.eval_fraction=0.7421875")


@pytest.mark.slow
def test_undecayed_tracker_two_processes_match_one_in_float64(tmp_path):
    _compare(tmp_path, "64-true", 1e-10, 1e-10, "entropic.ema_decay=1")


@pytest.mark.slow
def test_two_processes_match_one_in_float32(tmp_path):
    _compare(tmp_path, "32-true", tol_tracker=1e-5, tol_weights=1e-5)


@pytest.mark.slow
def test_sync_free_skip_two_processes_match_one_in_float64(tmp_path):
    """perf.sync_free_step with a NaN batch: every rank skips it on the device, as the single process does."""
    _compare(tmp_path, "64-true", 1e-10, 1e-10, "perf.sync_free_step=true", "train.nan_loss_steps=[2]")


@pytest.mark.slow
def test_two_processes_match_one_with_augmentation_in_float64(tmp_path):
    """data.augment on a tiny class-conditional digits U-Net with dropout and label dropout: each rank augments its
    slice of the global batch with the global batch's parameters, so the 2-process run takes the 1-process steps."""
    from train_utils import DIGITS

    overrides = [
        "model.net.model_channels=8", "model.net.channel_mult=[1]", "model.net.dropout=0.1", "data.batch_size=16",
        "data.augment=0.5", "train.total_images=64", "trainer.precision=64-true", "trainer.accelerator=cpu",
        "logger.kind=none", "evaluation.enabled=false", "trainer.progress_bar=false", "entropic.update_every_steps=2",
        "data.conditional=true", "model.net.label_dropout=0.2",
    ]
    ckpts = []
    for name, extra in (("one", ("trainer.devices=1",)), ("two", DDP)):
        proc = train_subprocess(DIGITS, [f"run.dir={tmp_path / name}", *overrides, *extra])
        assert proc.returncode == 0, proc.stderr[-3000:]
        ckpts.append(load(tmp_path / name / "checkpoints" / "last.ckpt"))
    one, two = ckpts
    assert one["global_step"] == two["global_step"] == 4
    assert one["evodiff"]["network"]["kwargs"]["augment_dim"] == 9
    for key, value in one["state_dict"].items():
        assert _rel(value, two["state_dict"][key]) < 1e-10, key


@pytest.mark.slow
def test_edm2_training_two_processes_match_one_in_float64(tmp_path):
    """EDM2Precond (forced weight normalisation of the head in training mode), EDM2's loss and lr decay, the
    power-function EMA profiles: the same 1-process answer (a float64 weight is normalised in float64)."""
    _compare(tmp_path, "64-true", 1e-10, 1e-10, "model.precond=edm2", "loss.kind=edm2", "ema.kind=power",
             "optim.schedule=edm2", "optim.ref_images=512")


@pytest.mark.slow
def test_edm2_unet_two_processes_match_one_in_float64(tmp_path):
    """The full EDM2 U-Net (forced weight normalisation of every layer, attention at 4x4): each rank
    normalises its replica's weights in each training-mode forward, from the same all-reduced steps (dropout on)."""
    _compare(tmp_path, "64-true", 1e-10, 1e-10, "model.net.dropout=0.1", "ema.snapshot_every_images=256",
             "optim.ref_images=512", config=DIGITS_EDM2, tiny=tiny_digits_edm2)
