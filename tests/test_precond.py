"""EDM preconditioning (Table 1) and loss (eq. (2)/(8)) against their closed forms."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn

from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import PRECONDS, EDMPrecond, VEPrecond, VPPrecond, build_precond, iDDPMPrecond
from evodiff_pl.training.losses import EDMLoss, LossOutput

SIGMAS = [0.002, 0.05, 0.5, 1.0, 7.3, 80.0]
SD = 0.5


class Recorder(nn.Module):
    """Backbone F(x, c_noise) = tanh(x) + c_noise that records what it was given."""

    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        self.x, self.c_noise, self.labels = x, c_noise, labels
        return torch.tanh(x) + c_noise.reshape(-1, *([1] * (x.ndim - 1)))


class Zero(nn.Module):
    def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.zeros_like(x)


def test_coefficients_match_table1_float64() -> None:
    net = EDMPrecond(Recorder(), sigma_data=SD)
    x = torch.randn(len(SIGMAS), 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor(SIGMAS, dtype=torch.float64)
    d = net(x, sigma)
    for i, s in enumerate(SIGMAS):
        c_skip = SD**2 / (s**2 + SD**2)
        c_out = s * SD / math.sqrt(s**2 + SD**2)
        c_in = 1 / math.sqrt(s**2 + SD**2)
        c_noise = math.log(s) / 4
        torch.testing.assert_close(net.backbone.x[i], c_in * x[i], rtol=1e-14, atol=0)
        assert net.backbone.c_noise[i].item() == pytest.approx(c_noise, rel=1e-14, abs=1e-15)
        expected = c_skip * x[i] + c_out * (torch.tanh(c_in * x[i]) + c_noise)
        torch.testing.assert_close(d[i], expected, rtol=1e-13, atol=1e-14)
    assert d.dtype == torch.float64 and net.backbone.c_noise.shape == (len(SIGMAS),)


def test_small_sigma_is_identity() -> None:
    net = EDMPrecond(build_network("mlp", dim=16, hidden=32, depth=1, emb_dim=16))
    with torch.no_grad():
        net.backbone.out.weight.normal_()  # F = O(1) so that the check is not trivial
    x = torch.randn(8, 16)
    f = net.backbone(x, torch.full((8,), math.log(1e-6) / 4))
    assert f.abs().max() > 0.1
    # D − x = (c_skip − 1)·x + c_out·F with 1 − c_skip ≈ 4e-12 and c_out ≈ 1e-6
    assert (net(x, 1e-6) - x).abs().max() <= 1.01e-6 * f.abs().max() + 1e-6


def test_zero_backbone_gives_c_skip_x_exactly() -> None:
    net = EDMPrecond(Zero(), sigma_data=SD)
    x = torch.randn(len(SIGMAS), 2, 5)
    sigma = torch.tensor(SIGMAS)
    c_skip = (SD**2 / (sigma**2 + SD**2)).reshape(-1, 1, 1)
    torch.testing.assert_close(net(x, sigma), c_skip * x, rtol=0, atol=0)


def test_scalar_and_per_sample_sigma_agree() -> None:
    net = EDMPrecond(Recorder())
    x = torch.randn(4, 3)
    expected = net(x, torch.full((4,), 0.3))
    for s in (0.3, torch.tensor(0.3), torch.tensor([0.3]), torch.full((4, 1), 0.3)):
        torch.testing.assert_close(net(x, s), expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match="one per sample"):
        net(x, torch.ones(3))


def test_labels_pass_through() -> None:
    net = EDMPrecond(Recorder())
    labels = torch.tensor([3, 1])
    net(torch.randn(2, 3), torch.ones(2), labels)
    assert net.backbone.labels is labels


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.bfloat16])
def test_autocast_bf16_keeps_wrapper_in_fp32(in_dtype: torch.dtype) -> None:
    class LinearF(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
            self.c_noise = c_noise
            self.f = self.lin(x)
            return self.f

    net = EDMPrecond(LinearF())
    x = torch.randn(6, 8).to(in_dtype)
    sigma = torch.tensor([0.002, 0.1, 0.5, 1.0, 10.0, 80.0])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        d = net(x, sigma)
    assert d.dtype == in_dtype
    assert net.backbone.f.dtype == torch.bfloat16  # the backbone did run under autocast
    assert net.backbone.c_noise.dtype == torch.float32
    s = sigma[:, None]
    expected = SD**2 / (s**2 + SD**2) * x.float() + s * SD / (s**2 + SD**2).sqrt() * net.backbone.f.float()
    torch.testing.assert_close(d.float(), expected.to(in_dtype).float(), rtol=1e-6, atol=1e-6)


def _gaussian_denoiser(c: float):
    def denoise(x: Tensor, sigma: Tensor) -> Tensor:
        s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
        return c**2 / (c**2 + s**2) * x  # E[x0 | x_σ] for x0 ~ N(0, c² I)

    return denoise


def test_loss_mse_matches_gaussian_mmse() -> None:
    c, per_level, dim = 0.7, 2048, 64
    levels = torch.tensor([0.01, 0.1, 0.7, 2.0, 20.0], dtype=torch.float64)
    g = torch.Generator().manual_seed(1)
    x0 = c * torch.randn(len(levels) * per_level, dim, generator=g, dtype=torch.float64)
    sigma = levels.repeat_interleave(per_level)
    out = EDMLoss()(_gaussian_denoiser(c), x0, sigma=sigma, generator=g)
    mmse = levels**2 * c**2 / (levels**2 + c**2)
    # per-sample mse ~ m·χ²_64/64, so the mean over 2048 samples has relative s.e. √(2/(64·2048)) ≈ 0.39 %:
    # tolerance 2 % relative (≈ 5 s.e.)
    torch.testing.assert_close(out.mse.reshape(len(levels), per_level).mean(1), mmse, rtol=0.02, atol=0)


def test_loss_is_weight_times_mse() -> None:
    loss_fn = EDMLoss()
    net = EDMPrecond(build_network("mlp", dim=10, hidden=32, depth=1, emb_dim=16))
    x0 = torch.randn(64, 10)
    out = loss_fn(net, x0, generator=torch.Generator().manual_seed(0))
    assert isinstance(out, LossOutput)
    assert all(t.shape == (64,) and t.dtype == torch.float32 for t in out)
    torch.testing.assert_close(out.loss, out.weight * out.mse, rtol=1e-6, atol=0)
    torch.testing.assert_close(out.weight, (out.sigma**2 + SD**2) / (out.sigma * SD) ** 2)
    assert out.loss.requires_grad and not out.mse.requires_grad
    out.loss.mean().backward()
    assert net.backbone.out.weight.grad.abs().sum() > 0


def test_sample_sigma_lognormal() -> None:
    loss_fn = EDMLoss(P_mean=-1.2, P_std=1.2)
    s = loss_fn.sample_sigma(200_000, device="cpu", generator=torch.Generator().manual_seed(0))
    assert s.dtype == torch.float32 and s.shape == (200_000,)
    assert s.log().mean().item() == pytest.approx(-1.2, abs=0.01)
    assert s.log().std().item() == pytest.approx(1.2, abs=0.01)


def test_loss_common_random_numbers_and_labels() -> None:
    seen = {}

    def denoiser(x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        seen["labels"] = labels
        return 0.5 * x

    loss_fn = EDMLoss()
    x0 = torch.randn(5, 2, 3)
    a = loss_fn(denoiser, x0, generator=torch.Generator().manual_seed(7))
    b = loss_fn(denoiser, x0, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a.loss, b.loss, rtol=0, atol=0)
    noise = torch.randn_like(x0)
    c = loss_fn(denoiser, x0, sigma=2.0, noise=noise)
    torch.testing.assert_close(c.sigma, torch.full((5,), 2.0))
    torch.testing.assert_close(c.mse, (0.5 * (x0 + 2 * noise) - x0).square().mean(dim=(1, 2)))
    labels = torch.arange(5)
    loss_fn(denoiser, x0, labels)
    assert seen["labels"] is labels


def test_mlp_learns_gaussian_denoiser() -> None:
    torch.manual_seed(0)
    c, dim = 2.0, 8  # c != sigma_data: the initial D = c_skip·x is not already optimal
    net = EDMPrecond(build_network("mlp", dim=dim, hidden=64, depth=2, emb_dim=32))
    loss_fn = EDMLoss()
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(1)
    x_eval = c * torch.randn(2048, dim, generator=g)
    sig_eval = loss_fn.sample_sigma(2048, device="cpu", generator=g)
    n_eval = torch.randn(2048, dim, generator=g)

    def eval_excess() -> float:
        with torch.no_grad():
            ours = loss_fn(net, x_eval, sigma=sig_eval, noise=n_eval).loss.mean()
        best = loss_fn(_gaussian_denoiser(c), x_eval, sigma=sig_eval, noise=n_eval).loss.mean()
        return (ours / best - 1).item()

    before = eval_excess()
    for _ in range(600):
        loss_fn(net, c * torch.randn(128, dim)).loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    after = eval_excess()
    assert after < 0.05 < before, (before, after)  # weighted loss within 5 % of the Bayes-optimal one


def _vp_t(s: float) -> float:
    """t(σ) of the VP SDE with β_d = 19.9, β_min = 0.1 (EDM Table 1)."""
    return (math.sqrt(0.1**2 + 2 * 19.9 * math.log(1 + s**2)) - 0.1) / 19.9


@pytest.mark.parametrize("name,c_skip,c_out,c_in,c_noise", [
    ("vp", lambda s: 1.0, lambda s: -s, lambda s: 1 / math.sqrt(s**2 + 1), lambda s: 999 * _vp_t(s)),
    ("ve", lambda s: 1.0, lambda s: s, lambda s: 1.0, lambda s: math.log(s / 2)),
])
def test_vp_ve_coefficients_match_table1_float64(name, c_skip, c_out, c_in, c_noise) -> None:
    net = build_precond(name, Recorder())
    x = torch.randn(len(SIGMAS), 3, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    d = net(x, torch.tensor(SIGMAS, dtype=torch.float64))
    for i, s in enumerate(SIGMAS):
        assert net.backbone.c_noise[i].item() == pytest.approx(c_noise(s), rel=1e-12)
        expected = c_skip(s) * x[i] + c_out(s) * (torch.tanh(c_in(s) * x[i]) + c_noise(s))
        torch.testing.assert_close(d[i], expected, rtol=1e-12, atol=1e-12)


def test_vp_sigma_range_and_inverse() -> None:
    net = VPPrecond(Zero())
    t = torch.tensor([1e-5, 0.3, 1.0], dtype=torch.float64)
    torch.testing.assert_close(net.sigma_inv(net.sigma(t)), t, rtol=1e-10, atol=0)
    assert net.sigma_min == pytest.approx(float(net.sigma(torch.tensor(1e-5))))
    assert (VEPrecond(Zero()).sigma_min, VEPrecond(Zero()).sigma_max) == (0.02, 100.0)


def test_iddpm_uses_the_nearest_level_and_the_first_channels() -> None:
    class Double(nn.Module):  # F with 2C channels: mean part = x, variance part = junk
        def forward(self, x: Tensor, c_noise: Tensor, labels: Tensor | None = None) -> Tensor:
            self.c_noise = c_noise
            return torch.cat([x, torch.full_like(x, 1e9)], dim=1)

    net = iDDPMPrecond(Double())
    u = net.u
    sigma = torch.stack([u[10] * 1.001, u[500], u[998] * 0.999]).to(torch.float64)
    x = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    d = net(x, sigma)
    assert net.backbone.c_noise.tolist() == [999 - 10, 999 - 500, 999 - 998]
    c_in = 1 / (sigma**2 + 1).sqrt()
    torch.testing.assert_close(d, x - sigma.reshape(-1, 1, 1, 1) * c_in.reshape(-1, 1, 1, 1) * x)
    assert (net.sigma_min, net.sigma_max) == (float(u[999]), float(u[0]))


def test_precond_registry() -> None:
    assert set(PRECONDS) == {"edm", "vp", "ve", "iddpm", "edm2"}
    with pytest.raises(ValueError, match="unknown precond 'vpp'"):
        build_precond("vpp", Zero())
