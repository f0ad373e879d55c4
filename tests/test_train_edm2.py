"""EDM2 training: the learned-uncertainty loss by hand, its config checks, and exact resume with the power EMA."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
from train_utils import (DIGITS_EDM2, EVERY_STEP, GMM, assert_same_run, load, tiny_digits_edm2, tiny_gmm,
                         train_in_process)

from evodiff_pl.config.schema import ConfigError, load_config
from evodiff_pl.training.losses import EDM2Loss
from evodiff_pl.training.phema import list_snapshots
from evodiff_pl.training.run import build

EDM2 = ("model.precond=edm2", "loss.kind=edm2", "loss.P_mean=-0.4", "loss.P_std=1.0", "ema.kind=power",
        "optim.schedule=edm2", "optim.ref_images=192", "ema.snapshot_every_images=128")


def half_denoiser(u: torch.Tensor):
    """D(x) = x / 2 with a log-variance head returning `u` (requires grad) for every sample."""
    def denoiser(x, sigma, labels=None, return_logvar=False):
        assert return_logvar
        return x / 2, u.expand(x.shape[0]).reshape(-1, 1)
    return denoiser


def test_edm2_loss_by_hand():
    x0, noise = torch.tensor([[1.0, 2.0]]), torch.tensor([[0.5, -1.0]])
    u = torch.tensor([0.3], requires_grad=True)
    out = EDM2Loss(sigma_data=0.5)(half_denoiser(u), x0, sigma=1.0, noise=noise)
    # x = x0 + σ n = (1.5, 1.0), D = (0.75, 0.5), (D − x0)² = (0.0625, 2.25), λ(1) = (1 + 0.25)/0.25 = 5
    assert out.loss.item() == pytest.approx((5 * math.exp(-0.3) * 2.3125 + 2 * 0.3) / 2, rel=1e-6)  # per element
    assert out.mse.item() == pytest.approx(2.3125 / 2) and out.weight.item() == pytest.approx(5.0)
    # the optimum over u is e^u = λ · per-element MSE
    u_star = torch.tensor([math.log(5 * 2.3125 / 2)], requires_grad=True)
    EDM2Loss(sigma_data=0.5)(half_denoiser(u_star), x0, sigma=1.0, noise=noise).loss.sum().backward()
    assert abs(u_star.grad.item()) < 1e-6


@pytest.mark.parametrize("overrides, key", [
    (("loss.kind=edm2",), "model.precond"),
    (("ema.kind=power", "ema.stds=[0.05,0.3]"), "ema.stds"),
    (("ema.snapshot_every_images=1000",), "ema.snapshot_every_images"),
    (("optim.schedule=edm3",), "optim.schedule"),
])
def test_bad_edm2_settings_name_the_key(tmp_path, overrides, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        build(load_config(GMM, tiny_gmm(tmp_path, *overrides)))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 EDM2 steps uninterrupted, and 3 + 3 resumed (dropout on, so the RNG state matters)."""
    full = tmp_path_factory.mktemp("full")
    train_in_process(GMM, tiny_gmm(full, *EDM2, "model.net.dropout=0.1"))
    split = tmp_path_factory.mktemp("split")
    train_in_process(GMM, tiny_gmm(split, *EDM2, "model.net.dropout=0.1", "train.total_images=192"))
    train_in_process(GMM, tiny_gmm(split, *EDM2, "model.net.dropout=0.1"))
    return full, split


def test_resume_with_power_ema_is_exact(runs):
    full, split = runs
    a, b = load(full / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert a["state_dict"].keys() == b["state_dict"].keys()
    assert any(k.startswith("power_ema.profiles.1.") for k in a["state_dict"])
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    # the sampled EMA is the first profile
    assert torch.equal(a["state_dict"]["ema.backbone.inp.weight"],
                       a["state_dict"]["power_ema.profiles.0.backbone.inp.weight"])
    snaps_a, snaps_b = list_snapshots(full), list_snapshots(split)
    assert [(t, s) for t, s, _ in snaps_a] == [(t, s) for t, s, _ in snaps_b] == [
        (t, s) for t in (128, 256, 384) for s in (0.05, 0.10)]
    for (_, _, pa), (_, _, pb) in zip(snaps_a, snaps_b):
        sa, sb = torch.load(pa, weights_only=True)["state_dict"], torch.load(pb, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_resume_of_the_edm2_unet_is_exact(tmp_path):
    """The full EDM2 U-Net, whose every weight is overwritten by its normalised value in each training-mode
    forward (dropout on): a run killed after step 3 (the every-step run's step-3 archive and its snapshots so far)
    resumed gives the 6 uninterrupted steps' weights, EMA profiles, snapshots, Adam, tracker and schedule exactly."""
    full, split = tmp_path / "full", tmp_path / "split"
    train_in_process(DIGITS_EDM2, tiny_digits_edm2(full, "model.net.dropout=0.1", *EVERY_STEP))
    (split / "checkpoints").mkdir(parents=True)
    shutil.copy(full / "checkpoints" / "step-3.ckpt", split / "checkpoints" / "last.ckpt")
    for images, _, path in list_snapshots(full):
        if images <= 48:
            (split / path.parent.name).mkdir(exist_ok=True)
            shutil.copy(path, split / path.parent.name / path.name)
    half = load(split / "checkpoints" / "last.ckpt")
    train_in_process(DIGITS_EDM2, tiny_digits_edm2(split, "model.net.dropout=0.1"))
    a, b = load(full / "checkpoints" / "last.ckpt"), load(split / "checkpoints" / "last.ckpt")
    assert half["global_step"] == 3 and a["global_step"] == b["global_step"] == 6
    assert a["evodiff"]["network"]["name"] == "edm2unet"
    assert_same_run(a, b)
    weight = "net.backbone.enc.4x4_block0.attn_qkv.weight"
    assert not torch.equal(half["state_dict"][weight], a["state_dict"][weight])
    snaps_a, snaps_b = list_snapshots(full), list_snapshots(split)
    assert [(t, s) for t, s, _ in snaps_a] == [(t, s) for t, s, _ in snaps_b] == [
        (t, s) for t in (32, 64, 96) for s in (0.05, 0.10)]
    for (_, _, pa), (_, _, pb) in zip(snaps_a, snaps_b):
        sa, sb = torch.load(pa, weights_only=True)["state_dict"], torch.load(pb, weights_only=True)["state_dict"]
        assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_head_schedule_and_posthoc_ema_reach_sample_py(runs, tmp_path):
    from evodiff_pl.schedules.entropic import EntropicSchedule
    from evodiff_pl.training.phema import main as phema_main
    from evodiff_pl.sampling.cli import main as sample_main

    full, _ = runs
    head = EntropicSchedule.load(full / "schedule_head.json")
    assert head.source["method"] == "head" and head.sigma_range == (0.002, 80.0)
    out = tmp_path / "s"
    assert sample_main(["progress=false", f"ckpt={full}", "solver=euler", "schedule=head_rescaled_entropic,"
                        "head_entropic,rescaled_entropic", "nfe=4", "seeds=0-3", f"outdir={out}", "format=npz"]) == 0
    assert phema_main([f"run.dir={full}", "std=0.07", f"out={tmp_path / 'p.ckpt'}"]) == 0
    assert sample_main(["progress=false", f"ckpt={tmp_path / 'p.ckpt'}", "solver=euler", "schedule=head_entropic",
                        "nfe=4", "seeds=0-3", f"outdir={tmp_path / 'p'}", "format=npz"]) == 0


@pytest.mark.parametrize("name", ["gmm_edm2", "digits_edm2", "imagenet64_edm2"])
def test_edm2_configs_validate(name):
    from train_utils import ROOT

    cfg = load_config(ROOT / "configs" / f"{name}.yaml")
    assert (cfg.loss.kind, cfg.model.precond, cfg.ema.kind, cfg.optim.schedule) == ("edm2", "edm2", "power", "edm2")
