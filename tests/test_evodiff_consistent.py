import importlib
import math

import numpy as np
import pytest
import torch

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.sampling.generate import generate, rank_indices
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.solvers import nfe, solve
from evodiff_pl.toy import GaussianMixture

NAME = "evodiff_consistent"
_module = importlib.import_module("evodiff_pl.solvers.evodiff_consistent")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(scope="module")
def small_mixture() -> GaussianMixture:
    return GaussianMixture.default(dim=16, n_components=4, seed=1)


@pytest.fixture(scope="module")
def grids(reference_mixture):
    """The three grid families of docs/evodiff_consistent.md §4; rescaled entropic from the mixture's exact MMSE."""
    levels = torch.logspace(math.log10(0.002), math.log10(80.0), 65, dtype=torch.float64)
    m = reference_mixture.mmse(levels, n_mc=1024, generator=torch.Generator().manual_seed(0))
    schedule = EntropicSchedule.from_mmse(levels, m, kind="rescaled_entropic", dim=reference_mixture.dim)
    return {
        "karras": lambda n: get_sigmas("karras", n),
        "logsnr": lambda n: get_sigmas("logsnr", n),
        "rescaled_entropic": lambda n: get_sigmas("rescaled_entropic", n, schedule=schedule),
    }


@pytest.fixture(scope="module")
def endpoint(reference, reference_mixture):
    x_T = torch.tensor(reference["x_T"][:32])
    # RK4 with 3000 steps in ln sigma: ~1e-10, far below the smallest solver error below (~1e-6)
    return x_T, reference_mixture.ode_solve(x_T, 80.0, 0.002, n_steps=3000)


def _order(mixture, x_T, exact, grid, steps, **options) -> float:
    """Fitted order of the median per-sample RMSE to the exact ODE endpoint over `steps` (docs/method.md §4)."""
    errs = [(solve(NAME, mixture, x_T, grid(n), **options) - exact).square().mean(1).sqrt().median().item()
            for n in steps]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f"{options}: median RMSE {['%.2e' % e for e in errs]} at steps {steps}, order {slope:.3f}")
    return slope


@pytest.mark.parametrize("eta", [0.0, None])
@pytest.mark.parametrize("grid", ["karras", "logsnr", "rescaled_entropic"])
def test_second_order_convergence_on_every_grid_family(reference_mixture, grids, endpoint, grid, eta):
    """Orders on these 32 samples: eta = 0 (default) 1.89 / 1.95 / 1.76, per sample 1.93 / 1.98 / 1.89."""
    x_T, exact = endpoint
    assert abs(_order(reference_mixture, x_T, exact, grids[grid], [192, 384, 768], eta=eta) - 2.0) < 0.25


def test_default_weight_order_from_few_steps(reference_mixture, grids, endpoint):
    """The default eta = 0 over N = 24-96 on the rescaled entropic grid: 1.67 on these 32 samples (1.82 on
    4,096, benchmarks/results/evodiff_consistent_weights_gmm.log)."""
    x_T, exact = endpoint
    assert abs(_order(reference_mixture, x_T, exact, grids["rescaled_entropic"], [24, 48, 96]) - 1.67) < 0.1


@pytest.mark.parametrize("lower_order_final", [True, False])
def test_fixed_weight_one_is_dpmpp_2m(small_mixture, lower_order_final):
    """eta = 1 keeps only the backward difference: DPM-Solver++(2M) with D evaluated at the accepted states."""
    x = 80.0 * torch.randn(8, small_mixture.dim, dtype=torch.float64)
    sigmas = get_sigmas("karras", 9)
    ours = solve(NAME, small_mixture, x, sigmas, eta=1.0, lower_order_final=lower_order_final)
    assert _rel(ours, solve("dpmpp_2m", small_mixture, x, sigmas, lower_order_final=lower_order_final)) < 1e-13


@pytest.mark.parametrize("shape", [(5, 7), (5, 3, 4, 4)])
def test_weight_minimises_the_norm_of_the_correction_per_sample_and_channel(shape):
    delta_b, delta_f = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    eta = _module._min_variance_weight(delta_b, delta_f)
    assert eta.shape == ((shape[0], 1) if len(shape) == 2 else (shape[0], shape[1], 1, 1))
    dims = tuple(range(1, len(shape))) if len(shape) == 2 else tuple(range(2, len(shape)))
    candidates = torch.linspace(0, 1, 2001, dtype=torch.float64)
    norms = torch.stack([(c * delta_b + (1 - c) * delta_f).square().sum(dims, keepdim=True) for c in candidates])
    brute = candidates[norms.argmin(0)].reshape(eta.shape)
    assert (eta - brute).abs().max().item() <= 5e-4


def test_equal_differences_give_weight_zero():
    d = torch.randn(3, 8, dtype=torch.float64)
    assert torch.equal(_module._min_variance_weight(d, d.clone()), torch.zeros(3, 1, dtype=torch.float64))


@pytest.mark.parametrize("n_steps", [1, 2, 3, 5, 21])
@pytest.mark.parametrize("options", [{}, {"lower_order_final": False}, {"eta": 0.0}, {"denoise_to_zero": True}])
def test_nfe_is_the_number_of_denoiser_calls(small_mixture, n_steps, options):
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        return small_mixture(x, sigma)

    x = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64)
    solve(NAME, denoiser, x, get_sigmas("karras", n_steps), **options)
    assert len(calls) == nfe(NAME, n_steps, **options) == n_steps + bool(options.get("denoise_to_zero"))


def test_samples_do_not_depend_on_the_batch_or_the_process_count(reference_mixture):
    """A deterministic per-sample map: batch 1 vs 13 vs all, and 1 vs 3 processes' strided shares, agree."""
    sigmas, n = get_sigmas("logsnr", 12), 26
    kwargs = dict(solver=NAME, sigmas=sigmas, seed=5, dtype=torch.float64)
    whole = generate(reference_mixture, torch.arange(n), (reference_mixture.dim,), batch_size=n, **kwargs)
    for batch in (1, 13):
        by_batch = generate(reference_mixture, torch.arange(n), (reference_mixture.dim,), batch_size=batch, **kwargs)
        assert _rel(by_batch, whole) < 1e-13, batch
    world = 3
    shares = [rank_indices(n, rank, world) for rank in range(world)]
    merged = torch.empty_like(whole)
    for idx in shares:
        merged[idx] = generate(reference_mixture, idx, (reference_mixture.dim,), batch_size=4, **kwargs)
    assert _rel(merged, whole) < 1e-13


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("output", ["zeros", "constant", "identity"])
@pytest.mark.parametrize("grid", ["karras", "logsnr"])
def test_degenerate_denoisers_give_finite_results(dtype, output, grid):
    c = torch.linspace(-1, 1, 8, dtype=dtype)

    def denoiser(x, sigma):
        return {"zeros": torch.zeros_like(x), "constant": c.expand_as(x), "identity": x}[output]

    x = 80.0 * torch.randn(3, 8, dtype=dtype)
    for n_steps in (2, 6, 25):
        out = solve(NAME, denoiser, x, get_sigmas(grid, n_steps))
        assert torch.isfinite(out).all()
        if output != "identity":
            # D constant: every difference vanishes, every step is DDIM: x_N = D + (sigma_N / sigma_0) (x_0 - D)
            d = denoiser(x, None)
            assert _rel(out, d + (0.002 / 80.0) * (x - d)) < 1e-5


@pytest.mark.parametrize("eta", [-0.1, 1.5, math.nan])
def test_bad_eta_raises(small_mixture, eta):
    with pytest.raises(ValueError, match="eta"):
        solve(NAME, small_mixture, torch.randn(2, small_mixture.dim), get_sigmas("logsnr", 5), eta=eta)
