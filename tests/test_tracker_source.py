"""What the σ-binned tracker records (`entropic.source`, `entropic.eval_fraction`) and its default decay."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from train_utils import GMM, tiny_gmm, train_in_process

import evodiff_pl.training.module as module_mod
from evodiff_pl.config.schema import ConfigError, EMAConfig, EntropicConfig, load_config
from evodiff_pl.schedules.entropic import KINDS, EntropicSchedule
from evodiff_pl.training.clock import tracker_sigmas
from evodiff_pl.training.module import EDMModule
from evodiff_pl.networks.mlp import MLPDenoiser
from evodiff_pl.networks.precond import EDMPrecond
from evodiff_pl.training.losses import EDMLoss
from evodiff_pl.toy import GaussianMixture


class ExactDenoiser(nn.Module):
    """The mixture's exact D(x, σ) in the place of the EMA network."""

    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, x: Tensor, sigma: Tensor) -> Tensor:
        return self.mixture.denoise(x, sigma)


def _module(global_batch: int, dim: int = 8, **entropic) -> EDMModule:
    net = EDMPrecond(MLPDenoiser(dim, hidden=16, depth=1, emb_dim=8))
    return EDMModule(net, EDMLoss(), sample_shape=(dim,), num_classes=0, global_batch=global_batch, seed=0,
                     ema=EMAConfig(halflife_images=10_000), entropic=EntropicConfig(**entropic))


@pytest.mark.parametrize("world_size", [1, 2, 3, 8])
def test_ema_pass_takes_the_same_global_positions_on_any_number_of_processes(monkeypatch, world_size):
    """eval_fraction 5/24 of a 24-sample batch: global positions 0-4, whichever rank holds them (8 ranks: some none),
    each with the same σ and loss as in one process."""
    module = _module(24, eval_fraction=5 / 24).double()
    module.batches_seen = 7
    x0, noise = torch.randn(24, 8, dtype=torch.float64), torch.randn(24, 8, dtype=torch.float64)
    outs = []
    for rank in range(world_size):
        monkeypatch.setattr(module_mod, "world", lambda r=rank: (r, world_size))
        mine = slice(rank, None, world_size)
        outs.append(module._ema_eval_loss(x0[mine], torch.zeros(24 // world_size), noise[mine]))
    monkeypatch.setattr(module_mod, "world", lambda: (0, 1))
    one = module._ema_eval_loss(x0, torch.zeros(24), noise)
    for field in ("sigma", "mse", "weight"):
        got = torch.cat([getattr(o, field) for o in outs])
        order = torch.cat([torch.arange(5)[r::world_size] for r in range(world_size)]).argsort()
        assert torch.allclose(got[order], getattr(one, field), rtol=1e-12, atol=0), field
    assert one.sigma.shape == (5,)


def test_ema_pass_sigmas_fill_the_log_sigma_strata():
    """P = 10 positions: one σ in each tenth of [ln 0.002, ln 80], shifted by frac(b φ) per batch b."""
    module = _module(40, eval_fraction=0.25)
    lo, hi = math.log(0.002), math.log(80.0)
    for b in (0, 1, 2, 1000):
        u = (tracker_sigmas(b, module.eval_positions, module.sigma_min, module.sigma_max).log() - lo) / (hi - lo) * 10
        shift = (b * (math.sqrt(5) - 1) / 2) % 1
        assert torch.allclose(u, torch.arange(10, dtype=torch.float64) + shift, atol=1e-9), b


def test_ema_pass_of_the_exact_denoiser_gives_the_exact_schedule():
    """Ground truth: with the mixture's exact denoiser as the EMA network, the tracked q is λ·MMSE, so the schedule
    from the tracker matches the one from the exact MMSE curve (65,536 tracked samples)."""
    mixture = GaussianMixture.default(dim=64, n_components=8, seed=0)
    module = _module(4096, dim=64, eval_fraction=0.5, ema_decay=1.0)
    module.ema = ExactDenoiser(mixture)
    g = torch.Generator().manual_seed(5)
    for step in range(32):
        x0 = mixture.sample(4096, generator=g).double()
        module.batches_seen = step
        _, noise = module.draw_noise(step, torch.float64)
        out = module._ema_eval_loss(x0, torch.zeros(4096), noise)
        assert out.sigma.shape == (2048,)
        module.tracker.update(out.sigma, out.mse, out.weight)
    module.tracker.sync()
    assert module.tracker.ema_decay is None and module.tracker.counts().sum().item() > 0.9999 * 32 * 2048
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), 65, dtype=torch.float64)
    exact = mixture.mmse(sigmas, n_mc=4096, generator=torch.Generator().manual_seed(1))
    for kind in KINDS:
        reference = EntropicSchedule.from_mmse(sigmas, exact, kind=kind)
        tracked = EntropicSchedule.from_loss_stats(module.tracker, kind=kind)
        for n in (5, 10, 20):
            diff = (tracked.sigmas(n).log() - reference.sigmas(n).log())[1:-1].abs().max().item()
            assert diff < 0.1, (kind, n, diff)
    module.rebuild_schedule()
    assert module.entropic_schedule.source["loss_of"] == "ema_eval"


def test_default_tracker_decay_has_the_ema_half_life():
    module = _module(128)
    assert module.tracker.ema_decay == pytest.approx(0.5 ** (128 / 10_000), rel=1e-15)
    assert module.tracker.ema_decay ** (10_000 / 128) == pytest.approx(0.5)
    assert _module(128, ema_decay=0.99).tracker.ema_decay == 0.99
    assert _module(128, ema_decay=1.0).tracker.ema_decay is None  # plain running sums


@pytest.mark.parametrize("source, per_step", [("ema_eval", 16), ("train_loss", 64)])
def test_tracker_counts_the_samples_of_its_source(tmp_path, source, per_step):
    """6 steps of 64 samples; eval_fraction 1/4 tracks 16 of them per step (σ beyond [0.002, 80] dropped)."""
    run = train_in_process(GMM, tiny_gmm(tmp_path, f"entropic.source={source}", "entropic.eval_fraction=0.25",
                                          "entropic.ema_decay=1"))
    counts = run.module.tracker.counts().sum().item()
    assert 6 * per_step - 2 <= counts <= 6 * per_step


@pytest.mark.parametrize("override, message", [
    ("entropic.source=ema", r"entropic\.source='ema' is not one of ema_eval, train_loss"),
    ("entropic.eval_fraction=0", r"entropic\.eval_fraction must be in \(0, 1\], got 0"),
    ("entropic.ema_decay=1.5", r"entropic\.ema_decay must be in \(0, 1\], got 1\.5"),
])
def test_bad_tracker_settings_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(GMM, [override])
