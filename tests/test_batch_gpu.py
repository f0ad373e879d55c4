"""data.batch_gpu (edm's --batch-gpu): rounds of at most batch_gpu samples per process, gradients accumulated and
all-reduced once, compute the run without it, dropout included. In float64 every difference is summation order:
weights, EMA, Adam moments and the tracker agree to 1e-9 after 6 steps; a value that does not divide the per-process
batch is one ConfigError."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import GMM, load, tiny_gmm, train_in_process, train_subprocess

from evodiff_pl.config.schema import ConfigError, load_config
from evodiff_pl.training.accumulate import rounds
from evodiff_pl.training.run import build

STEPS = ("data.batch_size=8", "train.total_images=48", "trainer.precision=64-true", "entropic.update_every_steps=3",
         "model.net.dropout=0.2", "model.net.depth=2")
"""6 steps of 8 samples, dropout in two blocks (two mask draws per forward, so masks drawn per round in order would
differ): a sample's masks follow its global position, not its round or process."""


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / a.double().abs().max().clamp_min(1e-300)).item()


def _assert_same_run(a: dict, b: dict, tol: float) -> None:
    assert a["global_step"] == b["global_step"] == 6
    ea, eb = a["evodiff"], b["evodiff"]
    assert ea["images_seen"] == eb["images_seen"] == 48
    for key in ("sum", "count"):  # the schedule is a function of these
        assert _rel(ea["tracker"][key], eb["tracker"][key]) < tol, key
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():  # net.* and ema.*
        assert _rel(value, b["state_dict"][key]) < tol, key
    sa, sb = a["optimizer_states"][0]["state"], b["optimizer_states"][0]["state"]
    for i in sa:
        for moment in ("exp_avg", "exp_avg_sq"):
            assert _rel(sa[i][moment], sb[i][moment]) < tol, (i, moment)


def test_rounds_cover_the_batch_in_order():
    assert rounds(8, 2) == [slice(0, 2), slice(2, 4), slice(4, 6), slice(6, 8)]
    assert rounds(8, None) == [slice(0, 8)] and rounds(0, 2) == [slice(0, 0)]


@pytest.mark.parametrize("source", ["ema_eval", "train_loss"])
def test_batch_gpu_computes_the_run_without_it_in_float64(tmp_path, source):
    """Batch 8 in rounds of 2 (the EMA pass of entropic.source=ema_eval too: eval_fraction=1) vs at once, 6 steps."""
    runs = []
    for name, extra in (("whole", ()), ("rounds", ("data.batch_gpu=2",))):
        train_in_process(GMM, tiny_gmm(tmp_path / name, *STEPS, f"entropic.source={source}", *extra))
        runs.append(load(tmp_path / name / "checkpoints" / "last.ckpt"))
    _assert_same_run(*runs, tol=1e-9)


def test_batch_gpu_that_does_not_divide_the_per_process_batch_is_one_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"data.batch_gpu=3 must divide the per-process batch 8 .*data.batch_gpu=2"):
        build(load_config(GMM, tiny_gmm(tmp_path, *STEPS, "data.batch_gpu=3")))
    with pytest.raises(ConfigError, match="batch_gpu must be >= 1"):
        build(load_config(GMM, tiny_gmm(tmp_path, *STEPS, "data.batch_gpu=0")))


@pytest.mark.ddp
@pytest.mark.slow
def test_batch_gpu_on_two_processes_computes_the_one_process_run_in_float64(tmp_path: Path):
    """2 gloo processes, 4 samples each in rounds of 1 (no all-reduce until the last round) vs 1 process at once."""
    ddp = ("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_gpu=1")
    runs = []
    for name, extra in (("one", ()), ("two", ddp)):
        proc = train_subprocess(GMM, tiny_gmm(tmp_path / name, *STEPS, *extra))
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs.append(load(tmp_path / name / "checkpoints" / "last.ckpt"))
    _assert_same_run(*runs, tol=1e-9)


def test_a_cap_above_the_per_process_batch_is_one_round(tmp_path):
    run = build(load_config(GMM, tiny_gmm(tmp_path, *STEPS, "data.batch_gpu=16")))
    assert run.module.batch_gpu == 16 and rounds(8, 16) == [slice(0, 16)]
