"""EDM2's U-Net and preconditioner: D and the uncertainty u(σ) equal NVlabs edm2's recorded outputs on random
weights (eval and training mode, forced weight normalisation and gradients included)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from tolerances import SAFETY, float32_spread, float32_tolerance, rel_error, rounding_depth

from evodiff_pl.networks import build_network
from evodiff_pl.networks.edm2 import PRESETS, EDM2UNet
from evodiff_pl.networks.precond import EDM2Precond, build_precond

DATA = Path(__file__).parent / "data"
REF = np.load(DATA / "edm2_outputs.npz")
CONFIGS: dict[str, dict[str, Any]] = {  # edm2 Precond kwargs of each recorded network (tests/data/README.md)
    "cond_attn": dict(img_resolution=16, img_channels=3, label_dim=4, model_channels=4, channel_mult=[1, 2],
                      num_blocks=1, attn_resolutions=[8], channels_per_head=2, logvar_channels=16),
    "uncond": dict(img_resolution=8, img_channels=2, label_dim=0, model_channels=4, channel_mult=[1, 2, 2],
                   num_blocks=2, attn_resolutions=[], channels_per_head=4, logvar_channels=8, res_balance=0.4,
                   attn_balance=0.2, concat_balance=0.6, channel_mult_noise=2, channel_mult_emb=3, clip_act=2),
    "cond_filter": dict(img_resolution=8, img_channels=4, label_dim=3, model_channels=4, channel_mult=[1, 2],
                        num_blocks=1, attn_resolutions=[8, 4], channels_per_head=2, logvar_channels=8,
                        resample_filter=[1, 3, 3, 1], clip_act=None, label_balance=0.3, dropout=0.1),
}


def _build(kind: str) -> EDM2Precond:
    kw = dict(CONFIGS[kind])
    channels, logvar_channels = kw.pop("img_channels"), kw.pop("logvar_channels")
    net = build_network("edm2unet", in_channels=channels, out_channels=channels, **kw)
    precond = build_precond("edm2", net, logvar_channels=logvar_channels)
    prefix = f"{kind}_state."
    state = {k[len(prefix):].replace("unet.", "backbone.", 1): torch.from_numpy(REF[k]) for k in REF.files
             if k.startswith(prefix)}
    precond.load_state_dict(state, strict=True)
    return precond


def _inputs(kind: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    labels = torch.from_numpy(REF[f"{kind}_labels"]) if f"{kind}_labels" in REF else None
    return torch.from_numpy(REF[f"{kind}_x"]), torch.from_numpy(REF[f"{kind}_sigma"]), labels


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_eval_outputs_and_logvar_match_edm2(kind: str) -> None:
    """Ours in float64 on edm2's float32 weights and inputs: the difference is edm2's own float32 rounding."""
    precond = _build(kind).eval().double()
    tol = float32_tolerance(rounding_depth(precond))
    x, sigma, labels = _inputs(kind)
    x, sigma = x.double(), sigma.double()
    with torch.no_grad():
        d, logvar = precond(x, sigma, labels, return_logvar=True)
        assert rel_error(d, REF[f"{kind}_D"]) <= tol
        assert logvar.shape == (3, 1, 1, 1) and rel_error(logvar, REF[f"{kind}_logvar"]) <= tol
        if labels is not None:  # no labels = edm2's all-zero class label
            assert rel_error(precond(x, sigma), REF[f"{kind}_D_nolabel"]) <= tol
        levels = torch.from_numpy(REF[f"{kind}_levels"]).double()
        assert rel_error(precond.logvar(levels), REF[f"{kind}_levels_logvar"]) <= tol


def _train(kind: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Two training-mode forwards with EDM2's loss on fixed targets, in `dtype`: per step D, u(σ) and the loss,
    then the weights after forced normalisation and the gradients of the second step."""
    precond = _build(kind).train().to(dtype)
    x, sigma, labels = _inputs(kind)
    x, sigma, y = x.to(dtype), sigma.to(dtype), torch.from_numpy(REF[f"{kind}_train_y"]).to(dtype)
    out = {}
    for step in range(2):
        d, logvar = precond(x, sigma, labels, return_logvar=True)
        s = sigma.reshape(-1, 1, 1, 1)
        weight = (s**2 + 0.25) / (s * 0.5) ** 2
        loss = ((weight / logvar.exp()) * (d - y) ** 2 + logvar).mean()
        precond.zero_grad(set_to_none=True)
        loss.backward()
        out |= {f"train{step}_D": d, f"train{step}_logvar": logvar, f"train{step}_loss": loss}
    for name, p in precond.named_parameters():
        ref_name = name.replace("backbone.", "unet.", 1)
        out |= {f"train_state.{ref_name}": p, f"train_grad.{ref_name}": p.grad}
    return out


@pytest.mark.parametrize("kind", ["cond_attn", "uncond"])
def test_training_mode_forced_weight_norm_and_gradients_match_edm2(kind: str) -> None:
    """Outputs, u(σ), the weights after forced normalisation and the gradients of the second step equal edm2's.
    Ours in float64: edm2's float32 rounding is bounded a priori, except for the gradients, whose summed terms
    cancel (a scalar gain's gradient is a sum over every channel and position): there, the bound is SAFETY times
    the measured float32 − float64 spread of this same computation."""
    ours = _train(kind, torch.float64)
    x = torch.from_numpy(REF[f"{kind}_x"])
    forward = rounding_depth(_build(kind))
    tol = float32_tolerance(2 * forward + x[:, 0].numel())  # forward, backward, the sum over batch and positions
    spread = float32_spread(lambda dtype: {k: v for k, v in _train(kind, dtype).items() if "grad" in k})
    for key, value in ours.items():
        ref = REF[f"{kind}_{key}"]
        if key in spread:
            bound = SAFETY * spread[key] + tol * np.abs(ref).max()
            assert np.abs(value.detach().numpy() - ref).max() <= bound, key
        else:
            assert rel_error(value, ref) <= tol, key


def test_logvar_reads_the_head_without_updating_it() -> None:
    precond = _build("cond_attn").train()
    before = precond.logvar_linear.weight.detach().clone()
    u = precond.logvar(torch.tensor([0.002, 0.1, 1.0, 10.0, 80.0]))
    assert torch.equal(precond.logvar_linear.weight, before) and u.shape == (5,)
    assert rel_error(u, REF["cond_attn_levels_logvar"]) <= float32_tolerance(rounding_depth(precond), sides=2)


def test_presets_set_edm2_widths_and_explicit_values_win() -> None:
    assert PRESETS["img512-xxl"] == dict(model_channels=448, dropout=0.1)
    assert PRESETS["img64-s"] == dict(model_channels=192, dropout=0.0)
    net = EDM2UNet(8, 3, 3, preset="tiny", model_channels=8)
    assert net.enc["8x8_conv"].weight.shape == (8, 4, 3, 3) and list(net.enc) == ["8x8_conv", "8x8_block0",
                                                                                  "4x4_down", "4x4_block0"]
    with pytest.raises(ValueError, match="unknown preset 'huge'"):
        EDM2UNet(8, 3, 3, preset="huge")


def test_float64_and_untrained_network() -> None:
    """A fresh network has out_gain = 0: F = 0 and D = c_skip·x; float64 inputs give float64 outputs."""
    precond = build_precond("edm2", EDM2UNet(8, 2, 2, preset="tiny")).eval()
    x = torch.randn(2, 2, 8, 8, dtype=torch.float64)
    d, logvar = precond(x, torch.tensor([0.5, 2.0]), return_logvar=True)
    c_skip = 0.25 / (torch.tensor([0.5, 2.0], dtype=torch.float64) ** 2 + 0.25)
    assert d.dtype == logvar.dtype == torch.float64
    torch.testing.assert_close(d, c_skip.reshape(-1, 1, 1, 1) * x)


def test_train_config_builds_edm2_from_a_preset(tmp_path: Path) -> None:
    """model.network=edm2unet, model.net.preset=tiny, model.precond=edm2: train.py's composition root builds it,
    and a training-mode EDM loss step runs (forced weight normalisation keeps the weights at unit RMS)."""
    from evodiff_pl.config.schema import load_config
    from evodiff_pl.training.run import build

    text = (Path(__file__).parents[1] / "configs" / "digits.yaml").read_text()
    head, rest = text.split("  network: songunet\n", 1)
    rest = rest[rest.index("  sigma_data"):]
    model = "  network: edm2unet\n  precond: edm2\n  net:\n    preset: tiny\n"
    (tmp_path / "edm2.yaml").write_text(head + model + rest)
    cfg = load_config(tmp_path / "edm2.yaml", [f"run.dir={tmp_path / 'run'}", "logger.kind=none",
                                               "evaluation.enabled=false"])
    module = build(cfg).module
    assert type(module.net) is EDM2Precond and type(module.net.backbone) is EDM2UNet
    assert module.meta["network"]["kwargs"]["preset"] == "tiny"
    net = module.net.train()
    x0 = torch.randn(4, 1, 8, 8)
    out = module.loss_fn(net, x0, generator=torch.Generator().manual_seed(0))
    out.loss.mean().backward()
    w = net.backbone.enc["8x8_block0"].conv_res0.weight
    assert torch.isfinite(out.loss).all() and w.grad is not None
    assert w.detach().square().mean(dim=(1, 2, 3)).sqrt().sub(1).abs().max() < 1e-3
