"""model.init=PATH: a run starts from an NVlabs pickle's, an exported or a run checkpoint's weights and EMA, with a
fresh optimizer, tracker and image count, our schedule kept; a network that does not fit is one error naming keys."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from train_utils import DIGITS, GMM, load, tiny_gmm, train_in_process

from evodiff_pl.config.schema import load_config
from evodiff_pl.io.checkpointing import CheckpointError, export_weights
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import build_precond
from evodiff_pl.training.losses import EDMLoss
from evodiff_pl.training.module import EDMModule
from evodiff_pl.training.datamodule import as_lightning
from evodiff_pl.training.run import build
from evodiff_pl.training.transfer import init_from

PICKLE = Path(__file__).parent / "data" / "nvlabs" / "ddpmpp_edm_cond.pkl"


@pytest.fixture(scope="module")
def source_run(tmp_path_factory) -> Path:
    """A 6-step mixture run with a schedule."""
    run_dir = tmp_path_factory.mktemp("src")
    train_in_process(GMM, tiny_gmm(run_dir))
    return run_dir


def _module(network: dict, precond: dict, shape: list[int], num_classes: int) -> EDMModule:
    net = build_precond(precond["name"], build_network(network["name"], **network["kwargs"]), **precond["kwargs"])
    return EDMModule(net, EDMLoss(), sample_shape=shape, num_classes=num_classes, global_batch=4, seed=0)


def _equal(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, state[k]) for k, v in module.state_dict().items())


def test_an_nvlabs_pickle_gives_its_ema_to_the_network_and_the_ema():
    meta = load_denoiser(PICKLE).meta
    module = _module(meta["network"], meta["precond"], meta["sample_shape"], meta["num_classes"])
    init_from(module, PICKLE)
    state = load_denoiser(PICKLE).denoiser.state_dict()
    assert _equal(module.net, state) and _equal(module.ema, state) and module.entropic_schedule is None


def test_a_network_that_does_not_fit_names_the_first_mismatched_keys():
    meta = load_denoiser(PICKLE).meta
    kwargs = {**meta["network"]["kwargs"], "model_channels": 2 * meta["network"]["kwargs"]["model_channels"]}
    module = _module({"name": "songunet", "kwargs": kwargs}, meta["precond"], meta["sample_shape"], 0)
    with pytest.raises(CheckpointError, match=r"does not fit the configured network \(shape \(file vs config\) "
                                              r"backbone\.\S+ \(\d+, .*model.network=songunet") as err:
        init_from(module, PICKLE)
    assert "\n" not in str(err.value)


def test_a_run_checkpoint_starts_a_new_run_with_its_weights_ema_and_schedule(tmp_path, source_run):
    src = load(source_run / "checkpoints" / "last.ckpt")
    assert src["evodiff"]["schedule"] is not None
    run = build(load_config(GMM, tiny_gmm(tmp_path / "dst", f"model.init={source_run}")))
    state = src["state_dict"]
    assert _equal(run.module.net, {k[4:]: v for k, v in state.items() if k.startswith("net.")})
    assert _equal(run.module.ema, {k[4:]: v for k, v in state.items() if k.startswith("ema.")})
    assert run.module.entropic_schedule.to_dict() == src["evodiff"]["schedule"]
    assert run.resume is None and run.module.images_seen == 0 and run.module.tracker.steps == 0
    run.trainer.fit(run.module, datamodule=as_lightning(run.datamodule))  # trains on from there, with a fresh Adam
    assert load(tmp_path / "dst" / "checkpoints" / "last.ckpt")["evodiff"]["images_seen"] == 384


def test_an_exported_checkpoint_gives_its_one_set_to_both(tmp_path, source_run):
    exported = export_weights(source_run, tmp_path / "ema.ckpt")
    run = build(load_config(GMM, tiny_gmm(tmp_path / "dst", f"model.init={exported}")))
    ema = load_denoiser(exported).denoiser.state_dict()
    assert _equal(run.module.net, ema) and _equal(run.module.ema, ema)


def test_a_checkpoint_of_the_older_unet_layout_is_mapped(tmp_path):
    """benchmarks/results/digits_640k_ema.ckpt (format version 1): the fine-tuning example of the README."""
    ckpt = Path(__file__).parent.parent / "benchmarks" / "results" / "digits_640k_ema.ckpt"
    run = build(load_config(DIGITS, [f"run.dir={tmp_path}", f"model.init={ckpt}", "logger.kind=none"]))
    ema = load_denoiser(ckpt).denoiser.state_dict()
    assert _equal(run.module.net, ema) and _equal(run.module.ema, ema)
