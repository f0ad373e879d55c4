import math

import pytest
import torch

from evodiff_pl.toy import GaussianMixture


def test_ode_solve_matches_reference_endpoint(reference, reference_mixture):
    x = reference_mixture.ode_solve(torch.tensor(reference["x_T"]), 80.0, 0.002)
    ref = torch.tensor(reference["x_exact"])
    assert ((x - ref).norm() / ref.norm()).item() < 1e-8


def test_single_gaussian_denoiser_and_mmse_are_closed_form():
    v, sigmas = 0.3, torch.tensor([0.01, 0.5, 3.0, 40.0], dtype=torch.float64)
    mu = torch.linspace(-1, 1, 16, dtype=torch.float64)[None]
    g = GaussianMixture(torch.ones(1), mu, torch.tensor([v], dtype=torch.float64))
    x = torch.randn(5, 16, dtype=torch.float64)
    for s in sigmas.tolist():
        assert torch.allclose(g.denoise(x, s), mu + v / (v + s * s) * (x - mu), rtol=0, atol=1e-14)
    expected = sigmas**2 * v / (sigmas**2 + v)  # Gaussian MMSE per dimension
    assert torch.allclose(g.mmse(sigmas, n_mc=64), expected, rtol=1e-12)


def test_denoiser_satisfies_tweedie(reference_mixture):
    # D*(x, s) = x + s^2 grad log p_s(x)  (Tweedie / EDM eq. (3))
    g = reference_mixture
    x = (g.sample(16, torch.Generator().manual_seed(1)) + 0.4 * torch.randn(16, g.dim, dtype=torch.float64))
    x.requires_grad_(True)
    for s in (0.05, 0.4, 5.0):
        (score,) = torch.autograd.grad(g.log_prob(x, s).sum(), x)
        assert torch.allclose(g.denoise(x.detach(), s), x.detach() + s * s * score, rtol=0, atol=1e-10)


def test_rao_blackwellised_mmse_agrees_with_plain_monte_carlo(reference_mixture):
    g, gen = reference_mixture, torch.Generator().manual_seed(2)
    sigmas = torch.tensor([0.02, 0.3, 1.0, 10.0], dtype=torch.float64)
    m = g.mmse(sigmas, n_mc=2048, generator=gen)
    x0 = g.sample(20000, gen)
    for s, m_rb in zip(sigmas.tolist(), m.tolist()):
        err = (g.denoise(x0 + s * torch.randn(x0.shape, generator=gen, dtype=torch.float64), s) - x0).square()
        per_sample = err.mean(1)
        mc, se = per_sample.mean().item(), per_sample.std().item() / math.sqrt(len(per_sample))
        assert abs(mc - m_rb) < 4 * se + 0.01 * m_rb, (s, mc, m_rb, se)


def test_sample_moments_and_dtype_roundtrip():
    g = GaussianMixture.default(dim=8, n_components=3, seed=5)
    x, k = g.sample(200000, torch.Generator().manual_seed(0), return_labels=True)
    assert x.dtype == torch.float64 and x.shape == (200000, 8)
    mean = (g.weights[:, None] * g.means).sum(0)
    assert torch.allclose(x.mean(0), mean, atol=0.01)
    assert torch.bincount(k, minlength=3).double().div(200000).sub(g.weights).abs().max() < 0.005
    y = torch.randn(4, 8)
    assert g.denoise(y, torch.full((4,), 0.5)).dtype == torch.float32


def test_default_mixture_is_reproducible_and_validated():
    a, b = GaussianMixture.default(seed=3), GaussianMixture.default(seed=3)
    assert torch.equal(a.means, b.means) and a.dim == 64 and a.n_components == 8
    with pytest.raises(ValueError, match="variances"):
        GaussianMixture(torch.ones(2), torch.zeros(2, 3), torch.tensor([1.0, 0.0]))
