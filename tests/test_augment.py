"""EDM's geometric augmentation and training step against NVlabs edm's own code (tests/data/README.md), the
per-(seed, batch) draws, and the config errors of `data.augment`."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from tolerances import float32_tolerance, rel_error, rounding_depth
from torch.utils.data import DataLoader, TensorDataset
from train_utils import DIGITS, GMM

from evodiff_pl.data.augment import AUGMENT_DIM, augment, augment_labels, draw_params
from evodiff_pl.config.schema import ConfigError, OptimConfig, load_config
from evodiff_pl.training.module import EDMModule
from evodiff_pl.io.nvlabs import load_nvlabs_pickle
from evodiff_pl.training.losses import EDMLoss
from evodiff_pl.training.streams import batch_augment
from evodiff_pl.training.run import network_kwargs

DATA = Path(__file__).parent / "data"
LABEL_COLUMNS = {"xflip": [0], "yflip": [1], "scale": [2], "rotate_frac": [3, 4], "aniso": [5, 6],
                 "translate_frac": [7, 8], "configF_rgb16": list(range(9)), "configF_grey8": list(range(9))}
"""Columns of our 9-d labels that edm's pipe emits when only that transform is enabled."""
PARAM_COLUMNS = {"xflip": [0], "yflip": [1], "scale": [2], "rotate_frac": [3], "aniso": [4, 5],
                 "translate_frac": [6, 7]}
"""Columns of the raw parameters of each single-transform case (the config F cases use all eight)."""


AUGMENT_OPS, LABEL_OPS = 128, 16
"""Roundings per output pixel (padding, 12-tap upsampling in x and y, the bilinear resample, 12-tap downsampling)
and per label (the matrix products of the transforms); both sides float32 (tests/tolerances.py)."""
TOL_IMAGES, TOL_LABELS = float32_tolerance(AUGMENT_OPS, sides=2), float32_tolerance(LABEL_OPS, sides=2)


@pytest.fixture(scope="module")
def edm_augment() -> dict[str, np.ndarray]:
    return dict(np.load(DATA / "edm_augment.npz"))


@pytest.mark.parametrize("case", list(LABEL_COLUMNS))
def test_each_transform_matches_edm(edm_augment: dict, case: str) -> None:
    ref = edm_augment
    images = torch.from_numpy(ref["images_grey8" if case.endswith("grey8") else "images_rgb16"])
    params = torch.from_numpy(ref[f"{case}_params"])
    out, labels = augment(images, params)
    assert out.dtype == torch.float32 and out.shape == images.shape
    assert rel_error(out, ref[f"{case}_out"]) <= TOL_IMAGES
    assert rel_error(labels[:, LABEL_COLUMNS[case]], ref[f"{case}_labels"]) <= TOL_LABELS
    used = params.abs().sum(0) > 0  # the case exercises its transform's parameters and no other
    assert used.tolist() == [c in PARAM_COLUMNS.get(case, range(8)) for c in range(8)]


def test_zero_parameters_leave_images_unchanged() -> None:
    x = torch.rand(3, 3, 16, 16) * 2 - 1
    out, labels = augment(x, torch.zeros(3, 8))
    assert (out - x).abs().max() < 1e-5 and not labels.any() and labels.shape == (3, AUGMENT_DIM)
    assert not draw_params(64, 0.0, torch.Generator().manual_seed(0)).any()


def test_draws_follow_edm_probabilities() -> None:
    p, n = 0.3, 40000
    params = draw_params(n, p, torch.Generator().manual_seed(1))
    on = (params != 0).double().mean(0)
    # x-flip: ½ whenever p > 0 (edm's multiplier 1e8); y-flip: p·½; the others p; an anisotropy axis ½ of those
    expected = torch.tensor([0.5, p / 2, p, p, p, p / 2, p, p], dtype=torch.float64)
    assert (on - expected).abs().max() < 0.01
    assert params[:, [3, 5]].abs().max() <= math.pi
    scale = params[:, 2][params[:, 2] != 0]
    assert abs(scale.mean()) < 0.03 and abs(scale.std() - 1) < 0.03  # log2-scale / its std ~ N(0, 1)
    assert torch.equal(params, draw_params(n, p, torch.Generator().manual_seed(1)))


def test_rank_slices_transform_as_the_whole_batch() -> None:
    """Ranks hold samples r, r + W, ...; with the global batch's parameters sizing the padding, each rank's images
    are those of the one-process batch."""
    x = torch.rand(8, 3, 16, 16) * 2 - 1
    params = draw_params(8, 0.8, torch.Generator().manual_seed(2))
    whole, whole_labels = augment(x, params)
    for world in (2, 4):
        for rank in range(world):
            part, labels = augment(x[rank::world], params[rank::world], pad_params=params)
            assert (part - whole[rank::world]).abs().max() < 1e-6
            assert torch.equal(labels, whole_labels[rank::world])


def test_augmentation_draws_depend_on_seed_and_batch_only() -> None:
    assert torch.equal(batch_augment(5, 7, 4, 0.5), batch_augment(5, 7, 4, 0.5))
    assert not torch.equal(batch_augment(5, 7, 4, 0.5), batch_augment(5, 8, 4, 0.5))
    assert not torch.equal(batch_augment(5, 7, 4, 0.5), batch_augment(6, 7, 4, 0.5))
    assert torch.equal(augment_labels(batch_augment(5, 7, 4, 0.5)), augment(torch.zeros(4, 3, 8, 8),
                                                                            batch_augment(5, 7, 4, 0.5))[1])


def test_training_step_matches_edm(tmp_path: Path) -> None:
    """One step of our module (augmentation, loss, backward, Adam) from edm's recorded weights, batch and draws
    reproduces the step of edm's training loop: the moments carry the gradient (EDM's loss scale), the weights the
    update."""
    ref = dict(np.load(DATA / "edm_training_step.npz"))
    net = load_nvlabs_pickle(DATA / "nvlabs" / "ddpmpp_edm_cond.pkl").denoiser.train().requires_grad_(True)
    module = EDMModule(net, EDMLoss(), sample_shape=(3, 8, 8), num_classes=4, global_batch=4, seed=0, augment=0.5,
                       optim=OptimConfig(lr=1e-3, lr_rampup_images=10_000))
    module.images_seen, module.batches_seen = 2000, 500  # as resumed there: lr = 1e-3 · 2000 / 10000
    sigma, noise = module.draw_noise(500, torch.float32)
    assert torch.equal(sigma, torch.from_numpy(ref["sigma"])) and torch.equal(noise, torch.from_numpy(ref["noise"]))
    assert torch.equal(batch_augment(0, 500, 4, 0.5), torch.from_numpy(ref["augment_params"]))
    out, labels = augment(torch.from_numpy(ref["images"]), batch_augment(0, 500, 4, 0.5))
    assert rel_error(out, ref["augmented"]) <= TOL_IMAGES and rel_error(labels, ref["augment_labels"]) <= TOL_LABELS
    # the loss: a forward pass; the moments and the update carry the gradient: forward, backward and the sum over
    # the batch's positions, both sides float32
    tol_loss = float32_tolerance(rounding_depth(net), sides=2)
    tol = float32_tolerance(2 * rounding_depth(net) + out.numel() // out.shape[1], sides=2)

    batch = TensorDataset(torch.from_numpy(ref["images"]), torch.from_numpy(ref["labels"]))
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.fit(module, train_dataloaders=DataLoader(batch, batch_size=4))
    assert module.optimizers().param_groups[0]["lr"] == pytest.approx(float(ref["lr"]), rel=1e-12)
    # the logged loss is the per-element mean (EDM's logged Loss/loss), not the summed loss that is differentiated
    logged = float(trainer.callback_metrics["train/loss_per_elem"])
    assert logged == pytest.approx(float(ref["loss_per_elem"]), rel=tol_loss)
    state = trainer.optimizers[0].state
    params = dict(module.net.named_parameters())
    names = [str(n) for n in ref["param_names"]]
    assert names == list(params)
    for i, name in enumerate(names):
        p, moments = params[name].detach(), state[params[name]]
        for key, tensor in (("param", p), ("exp_avg", moments["exp_avg"]), ("exp_avg_sq", moments["exp_avg_sq"])):
            t = tensor.double()
            ours = torch.stack([t.sum(), t.abs().sum(), t.norm()])
            theirs = torch.from_numpy(ref[f"{key}_sum_abs_norm"][i])
            assert ((ours - theirs).abs() <= tol * theirs[1].abs() + 1e-30).all(), (name, key, ours, theirs)
        if f"after/{name}" in ref:
            assert rel_error(p, ref[f"after/{name}"]) <= tol, name
            assert rel_error(moments["exp_avg"], ref[f"exp_avg/{name}"]) <= tol, name
            assert rel_error(moments["exp_avg_sq"], ref[f"exp_avg_sq/{name}"]) <= tol, name


@pytest.mark.parametrize(
    "config, overrides, message",
    [
        (DIGITS, ["data.augment=1.5"], r"data\.augment=1\.5 must be in \[0, 1\]"),
        (DIGITS, ["data.augment=-0.1"], r"data\.augment=-0\.1 must be in \[0, 1\]"),
        (GMM, ["data.augment=0.12"], r"data\.augment=0\.12: augmentation needs images, data\.name=gmm"),
        (None, ["data.augment=0.12"], r"data\.augment=0\.12 needs a network with an augmentation input .* "
                                      r"model\.network=mlp"),
    ],
)
def test_bad_augment_config_is_one_line_naming_the_key(tmp_path: Path, config: Path | None, overrides: list[str],
                                                       message: str) -> None:
    if config is None:  # an MLP on the digits
        config = tmp_path / "mlp_digits.yaml"
        config.write_text("model:\n  network: mlp\ndata:\n  name: digits\n  batch_size: 64\n")
    with pytest.raises(ConfigError, match=message) as err:
        load_config(config, overrides)
    assert "\n" not in str(err.value)


def test_augment_sets_the_network_input_width() -> None:
    assert network_kwargs("songunet", {}, (1, 8, 8), 0, augment_dim=AUGMENT_DIM)["augment_dim"] == AUGMENT_DIM
    assert "augment_dim" not in network_kwargs("songunet", {}, (1, 8, 8), 0)
    with pytest.raises(ConfigError, match="model.net.augment_dim=4 does not match"):
        network_kwargs("songunet", {"augment_dim": 4}, (1, 8, 8), 0, augment_dim=AUGMENT_DIM)
    cfg = load_config(DIGITS, ["data.augment=0.12"])
    assert cfg.data.augment == 0.12


@pytest.mark.parametrize("name, classes", [("cifar10", False), ("cifar10_cond", True)])
def test_cifar10_configs_are_edm_config_f(name: str, classes: bool) -> None:
    """NVlabs edm's train.py defaults for --arch=ddpmpp --precond=edm (--cond=0 / 1)."""
    cfg = load_config(DIGITS.parent / f"{name}.yaml")
    assert cfg.model.network == "songunet" and cfg.model.precond == "edm" and cfg.model.sigma_data == 0.5
    net = dict(cfg.model.net)
    assert net == {"model_channels": 128, "channel_mult": [2, 2, 2], "channel_mult_emb": 4, "num_blocks": 4,
                   "attn_resolutions": [16], "dropout": 0.13, "embedding_type": "positional",
                   "channel_mult_noise": 1}
    assert (cfg.loss.P_mean, cfg.loss.P_std) == (-1.2, 1.2)
    assert (cfg.optim.lr, list(cfg.optim.betas), cfg.optim.eps, cfg.optim.lr_rampup_images) == (
        1e-3, [0.9, 0.999], 1e-8, 10_000_000)
    assert (cfg.ema.halflife_images, cfg.ema.rampup_ratio, cfg.train.total_images) == (500_000, 0.05, 200_000_000)
    assert (cfg.data.batch_size, cfg.data.augment, cfg.data.get("hflip", False)) == (512, 0.12, False)
    assert cfg.data.get("conditional", False) == classes and cfg.trainer.precision == "32-true"


def test_sampling_without_labels_is_the_zero_augmentation() -> None:
    """At sampling the augmentation input is None, which is exactly the all-zero vector ("not augmented")."""
    net = load_nvlabs_pickle(DATA / "nvlabs" / "ddpmpp_edm_cond.pkl").denoiser
    x, sigma, ids = torch.randn(4, 3, 8, 8), torch.tensor([0.01, 0.3, 2.0, 40.0]), torch.arange(4)
    with torch.no_grad():
        plain = net(x, sigma, ids)
        assert torch.equal(plain, net(x, sigma, ids, augment_labels=torch.zeros(4, AUGMENT_DIM)))
        assert not torch.equal(plain, net(x, sigma, ids, augment_labels=torch.ones(4, AUGMENT_DIM)))
