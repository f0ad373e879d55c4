"""The charts of a run: the schedule's NFE-10 grid as scalars at every rebuild, loss/schedule plots on log σ with the
training density, the training and EMA losses on one plot, and TensorBoard as a third logger."""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch
from train_utils import GMM, tiny_gmm, train_in_process

from evodiff_pl.config.schema import ConfigError, load_config
from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules.tracker import SigmaBinnedLoss
from evodiff_pl.training.charts import grid_scalars, lognormal_density, plot_loss_curve
from evodiff_pl.training.run import build

TB_TARGET = Path("/tmp/i24/tbenv")  # a `pip install --target` copy of tensorboard, when the venv has none


def test_the_training_density_is_the_lognormal_of_the_loss():
    sigma = torch.logspace(-6, 6, 20001, dtype=torch.float64)
    p = lognormal_density(sigma, -1.2, 1.2)
    assert torch.trapezoid(p, sigma.log()).item() == pytest.approx(1.0, abs=1e-9)
    assert sigma[p.argmax()].log().item() == pytest.approx(-1.2, abs=2e-3)


def test_grid_scalars_are_the_interior_points_of_the_grid():
    sched = EntropicSchedule.from_mmse(torch.logspace(-3, 2, 64, dtype=torch.float64),
                                       torch.logspace(-3, 2, 64, dtype=torch.float64).clamp(max=1.0) * 0.1,
                                       kind="rescaled_entropic")
    scalars = grid_scalars("schedule", sched, 10, 0.002, 80.0)
    grid = sched.sigmas(10, 0.002, 80.0)
    assert list(scalars) == [f"schedule/nfe10/sigma_{i}" for i in range(1, 10)]
    assert [scalars[f"schedule/nfe10/sigma_{i}"] for i in range(1, 10)] == pytest.approx(grid[1:10].tolist())


def test_loss_plot_is_titled_for_the_network_it_shows():
    tracker = SigmaBinnedLoss(0.002, 80.0, n_bins=8)
    sigma = torch.logspace(-2, 1, 64)
    tracker.update(sigma, sigma.clamp(max=0.25), torch.ones(64))
    ema = plot_loss_curve(tracker, "ema_eval", -1.2, 1.2).axes[0].get_title()
    raw = plot_loss_curve(tracker, "train_loss", -1.2, 1.2).axes[0].get_title()
    assert "EMA network" in ema and "trained network" in raw
    assert plot_loss_curve(tracker, "ema_eval", -1.2, 1.2).axes[1].get_xscale() == "log"


def test_every_schedule_rebuild_logs_the_grid_against_kimg_and_the_plots_are_drawn(tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=csv", "logger.log_every_steps=1",
                                   "trainer.val_every_steps=3", "train.total_images=640"))
    with (tmp_path / "csv" / "metrics.csv").open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("schedule/nfe10/sigma_1")]
    assert len(rows) >= 2  # rebuilt every 2 of 10 steps once the tracker holds enough samples
    for row in rows:
        grid = [80.0, *(float(row[f"schedule/nfe10/sigma_{i}"]) for i in range(1, 10)), 0.002]
        assert all(a > b for a, b in zip(grid, grid[1:])) and float(row["train/kimg"]) > 0
    for name in ("loss_per_sigma", "schedule", "losses"):
        assert (tmp_path / "plots" / f"{name}.png").is_file(), name


def test_tensorboard_without_the_package_is_one_config_error(tmp_path, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("tensorboard") else real(name, *a))
    with pytest.raises(ConfigError, match=r"^logger.kind=tensorboard needs the tensorboard package: pip install"):
        build(load_config(GMM, tiny_gmm(tmp_path, "logger.kind=tensorboard")))


def test_tensorboard_logger_writes_event_files(tmp_path, monkeypatch):
    if importlib.util.find_spec("tensorboard") is None:
        if not TB_TARGET.is_dir():
            pytest.skip("tensorboard is not installed")
        monkeypatch.setattr(sys, "path", [*sys.path, str(TB_TARGET)])
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=tensorboard", "logger.log_every_steps=1"))
    events = list((tmp_path / "tensorboard").rglob("events.out.tfevents.*"))
    assert events and math.prod(e.stat().st_size for e in events) > 0
