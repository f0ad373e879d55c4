"""Backbones: shapes, gradients, conditioning, embeddings, dropout, registry, the CIFAR-10 size."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tolerances import float32_tolerance, rounding_depth
from torch import nn

from evodiff_pl.io.checkpointing import CheckpointError
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.training.resume_point import resume_checkpoint
from evodiff_pl.networks import NETWORKS, build_network
from evodiff_pl.networks.layers import LabelEmbedding
from evodiff_pl.networks.unet_blocks import GroupNorm

DIGITS = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=16, channel_mult=(1, 2, 2),
              num_blocks=1, attn_resolutions=(4,), dropout=0.0)
RGB32 = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=16, channel_mult=(1, 2),
             num_blocks=1, attn_resolutions=(16,), dropout=0.0)
CIFAR10 = dict(img_resolution=32, in_channels=3, out_channels=3, model_channels=128, channel_mult=(2, 2, 2),
               num_blocks=4, attn_resolutions=(16,), dropout=0.13)
MLP = dict(dim=64, hidden=64, depth=2, emb_dim=32)
ADM = dict(img_resolution=8, in_channels=1, out_channels=1, model_channels=64, channel_mult=(1, 2),
           num_blocks=1, attn_resolutions=(4,), dropout=0.0)


def _inputs(name: str, cfg: dict, batch: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    res = cfg.get("img_resolution")
    shape = (batch, cfg["dim"]) if name == "mlp" else (batch, cfg["in_channels"], res, res)
    return torch.randn(shape, generator=g), (1.2 * torch.randn(batch, generator=g) - 1.2) / 4  # c_noise = ¼ ln σ


CASES = [("songunet", DIGITS), ("songunet", RGB32), ("mlp", MLP)]
ALL = CASES + [("dhariwalunet", ADM)]


def _randomised(net: nn.Module) -> nn.Module:
    """Every parameter redrawn ~ N(0, 0.1²): ADM's zero-initialised layers would otherwise block the gradients."""
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    return net


@pytest.mark.parametrize("name,cfg", CASES)
@pytest.mark.parametrize("embedding_type", ["positional", "fourier"])
def test_shape_and_near_zero_init(name: str, cfg: dict, embedding_type: str) -> None:
    torch.manual_seed(0)
    net = build_network(name, **cfg, embedding_type=embedding_type)
    x, c_noise = _inputs(name, cfg)
    y = net(x, c_noise)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    assert 0 < y.abs().max() < 1e-3  # output layer initialised at 1e-5 x Xavier (EDM)


def test_adm_output_layer_starts_at_zero() -> None:
    net = build_network("dhariwalunet", **ADM)
    x, c_noise = _inputs("dhariwalunet", ADM)
    assert torch.equal(net(x, c_noise), torch.zeros_like(x))  # ADM's zero-initialised output conv (edm)


@pytest.mark.parametrize("name,cfg", ALL)
def test_gradients_reach_every_parameter(name: str, cfg: dict) -> None:
    torch.manual_seed(0)
    net = _randomised(build_network(name, **cfg, label_dim=3))
    x, c_noise = _inputs(name, cfg)
    x.requires_grad_(True)
    y = net(x, c_noise, torch.tensor([0, 1, 2, 1]))
    (y * torch.randn_like(y)).sum().backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("name,cfg", ALL)
def test_label_conditioning(name: str, cfg: dict) -> None:
    torch.manual_seed(0)
    net = _randomised(build_network(name, **cfg, label_dim=10)).eval()
    x, c_noise = _inputs(name, cfg)
    a = net(x, c_noise, torch.tensor([0, 1, 2, 3]))
    b = net(x, c_noise, torch.tensor([4, 5, 6, 7]))
    null = net(x, c_noise)
    assert a.shape == x.shape and not torch.equal(a, b) and not torch.equal(a, null)
    with pytest.raises(ValueError, match="integer class ids"):
        net(x, c_noise, torch.zeros(4, 10))
    with pytest.raises(ValueError, match="unconditional"):
        build_network(name, **cfg)(x, c_noise, torch.zeros(4, dtype=torch.long))


def test_label_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    emb = LabelEmbedding(5, 8, dropout=0.5)
    labels = torch.randint(0, 5, (256,))
    dropped = (emb(labels, 256, labels.device, torch.float32) == 0).all(dim=1)
    assert 0.35 < dropped.float().mean() < 0.65
    assert not (emb.eval()(labels, 256, labels.device, torch.float32) == 0).all(dim=1).any()


@pytest.mark.parametrize("name,cfg", ALL)
def test_dropout_random_in_train_deterministic_in_eval(name: str, cfg: dict) -> None:
    torch.manual_seed(0)
    net = _randomised(build_network(name, **{**cfg, "dropout": 0.3}))
    x, c_noise = _inputs(name, cfg)
    assert not torch.equal(net.train()(x, c_noise), net(x, c_noise))
    assert torch.equal(net.eval()(x, c_noise), net(x, c_noise))


def test_cifar10_config_size() -> None:
    with torch.device("meta"):
        net = build_network("songunet", **CIFAR10)
    n = sum(p.numel() for p in net.parameters())
    assert 50e6 <= n <= 65e6, n  # EDM reports 55.7M for DDPM++ CIFAR-10


def test_registry_errors() -> None:
    assert set(NETWORKS) == {"songunet", "dhariwalunet", "mlp", "edm2unet"}
    with pytest.raises(ValueError, match="dhariwalunet.*mlp.*songunet"):
        build_network("resnet")
    with pytest.raises(TypeError, match="widht"):
        build_network("mlp", dim=4, widht=3)
    with pytest.raises(ValueError, match="embedding_type"):
        build_network("mlp", dim=4, embedding_type="learned")
    with pytest.raises(ValueError, match="divisible"):
        build_network("songunet", **{**DIGITS, "img_resolution": 6})
    with pytest.raises(ValueError, match="attn_resolutions"):
        build_network("songunet", **{**DIGITS, "attn_resolutions": (16,)})


@pytest.mark.parametrize("channels", [8, 48, 96, 256, 768])
def test_group_norm_groups_as_edm(channels: int) -> None:
    gn = GroupNorm(channels)
    assert gn.num_groups == min(32, channels // 4) and isinstance(gn, nn.GroupNorm)
    with pytest.raises(ValueError, match="groups"):
        GroupNorm(130)


@pytest.mark.parametrize("run", ["640k", "1920k"])
def test_old_layout_checkpoints_give_the_recorded_outputs(run: str) -> None:
    """Format-1 checkpoints (the SongUNet layout before NVlabs') are mapped on load: same denoiser as before."""
    ref = np.load(Path(__file__).parent / "data" / "digits_old_layout_denoiser.npz")
    den = load_denoiser(Path(__file__).parents[1] / "benchmarks" / "results" / f"digits_{run}_ema.ckpt").denoiser
    x, sigma = torch.from_numpy(ref["x"]), torch.from_numpy(ref["sigma"])
    with torch.no_grad():
        d32 = den(x.float(), sigma.float()).numpy()
        d64 = den.double()(x, sigma).numpy()
    tol32 = float32_tolerance(rounding_depth(den), sides=2)  # both float32 (tests/tolerances.py)
    for d, key, tol in [(d32, f"d_{run}_float32", tol32), (d64, f"d_{run}_float64", 1e-9)]:
        assert np.abs(d - ref[key]).max() <= tol * np.abs(ref[key]).max(), key


def test_old_layout_checkpoint_is_not_resumed(tmp_path: Path) -> None:
    ckpt = Path(__file__).parents[1] / "benchmarks" / "results" / "digits_640k_ema.ckpt"
    with pytest.raises(CheckpointError, match="format version 1 .*sampled from .* but not resumed"):
        resume_checkpoint(str(ckpt), tmp_path, {})
