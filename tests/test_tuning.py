import math

import pytest
import torch

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.schedules import get_sigmas
from evodiff_pl.solvers import solve
from evodiff_pl.toy import GaussianMixture
from evodiff_pl.evaluation.metrics import DataMoments
from evodiff_pl.tuning import (fd_to_data, grid_from_logits, logits_from_grid, median_rmse, reference_solution,
                              tune_sigmas)


@pytest.fixture(scope="module")
def mixture() -> GaussianMixture:
    return GaussianMixture.default()


@pytest.fixture(scope="module")
def start_grid(mixture):
    """The rescaled entropic NFE-5 grid of the mixture's exact MMSE (65 levels x 512 draws)."""
    levels = torch.logspace(math.log10(0.002), math.log10(80.0), 65, dtype=torch.float64)
    m = mixture.mmse(levels, n_mc=512, generator=torch.Generator().manual_seed(2))
    return get_sigmas("rescaled_entropic", 5, schedule=EntropicSchedule.from_mmse(levels, m, dim=mixture.dim))


def _noise(n: int, seed: int) -> torch.Tensor:
    return 80.0 * torch.randn(n, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.fixture(scope="module")
def held_out(mixture):
    x_T = _noise(128, 1)
    return x_T, mixture.ode_solve(x_T, 80.0, 0.002, n_steps=500)


def test_reference_solution_is_close_to_the_exact_ode_endpoint(mixture, held_out):
    x_T, exact = held_out
    err = (reference_solution(mixture, x_T, 80.0, 0.002) - exact).square().mean(1).sqrt()
    # measured (iPNDM, 200 log-SNR steps): median 1.75e-5, max 4.5e-4 per-sample RMSE; NFE-5 errors are > 2e-3
    assert err.median() < 3e-5 and err.max() < 1e-3


def test_logits_round_trip_and_give_a_decreasing_grid():
    s = get_sigmas("karras", 7)
    assert torch.allclose(grid_from_logits(logits_from_grid(s), 80.0, 0.002), s, rtol=1e-12)
    g = grid_from_logits(torch.tensor([3.0, -3.0, 0.0], dtype=torch.float64), 80.0, 0.002)
    assert g[0].item() == 80.0 and g[-1].item() == 0.002 and (g[1:] < g[:-1]).all()


@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc"])
def test_tuned_grid_lowers_the_held_out_endpoint_error(mixture, start_grid, held_out, solver):
    x_T, exact = held_out
    tuned = tune_sigmas(solver, mixture, _noise(32, 10), start_grid, max_evals=300)
    assert tuned.dtype == torch.float64 and tuned.shape == start_grid.shape
    assert tuned[0].item() == 80.0 and tuned[-1].item() == 0.002 and (tuned[1:] < tuned[:-1]).all()
    # measured on these 128 held-out noises: start 0.0254 (dpmpp_2m) / 0.0208 (unipc), tuned 0.0028 / 0.0029
    assert 0.018 < median_rmse(solve(solver, mixture, x_T, start_grid), exact) < 0.03
    assert median_rmse(solve(solver, mixture, x_T, tuned), exact) < 0.005


@pytest.mark.parametrize("objective", ["rmse", "slack", "fd"])
def test_same_inputs_give_the_same_grid_bit_for_bit(mixture, start_grid, objective):
    x_T = _noise(16, 3)
    ref = reference_solution(mixture, x_T, 80.0, 0.002)
    a = tune_sigmas("dpmpp_2m", mixture, x_T, start_grid, reference=ref, objective=objective, max_evals=60)
    b = tune_sigmas("dpmpp_2m", mixture, x_T.clone(), start_grid.clone(), reference=ref, objective=objective,
                    max_evals=60)
    assert torch.equal(a, b)


def _exact_moments(mixture: GaussianMixture) -> DataMoments:
    """The mixture's exact mean and covariance (law of total covariance); the features are the vectors."""
    w, means, v = mixture.weights, mixture.means, mixture.variances
    mean = w @ means
    cov = (w * v).sum() * torch.eye(mixture.dim, dtype=torch.float64) + (means.T * w) @ means - torch.outer(mean, mean)
    return DataMoments(mean, cov, lambda x: x)


def test_fd_data_of_exact_endpoints_is_only_the_finite_sample_bias(mixture, held_out):
    """Exact ODE endpoints are samples of the mixture: their FD to its exact moments is the estimate's bias, which
    falls as 1/n (measured: 0.426 for the 128 held-out noises, 0.060 for 1024 others)."""
    objective = fd_to_data(_exact_moments(mixture))
    x_T, exact = held_out
    more = _noise(1024, 5)
    small, large = objective(exact, None), objective(mixture.ode_solve(more, 80.0, 0.002, n_steps=500), None)
    assert 0.2 < small < 0.8 and 0.03 < large < 0.1


def test_fd_data_runs_the_solver_only_and_never_ends_above_its_start(mixture, start_grid):
    """No reference solution: every denoiser call is one of the solver's NFE 5 (measured: 41 runs, 205 calls)."""
    calls = []

    def denoiser(x, sigma):
        calls.append(1)
        return mixture(x, sigma)

    x_T, data = _noise(64, 11), _exact_moments(mixture)
    tuned = tune_sigmas("dpmpp_2m", denoiser, x_T, start_grid, objective="fd_data", data=data, max_evals=40)
    assert len(calls) % 5 == 0 and 5 < len(calls) <= 5 * 41
    assert tuned[0].item() == 80.0 and tuned[-1].item() == 0.002 and (tuned[1:] < tuned[:-1]).all()
    objective = fd_to_data(data)
    assert objective(solve("dpmpp_2m", mixture, x_T, tuned), None) <= objective(solve("dpmpp_2m", mixture, x_T,
                                                                                         start_grid), None)


def test_a_callable_objective_and_a_two_level_grid(mixture):
    x_T = _noise(4, 4)
    two = torch.tensor([80.0, 0.002], dtype=torch.float64)
    assert torch.equal(tune_sigmas("euler", mixture, x_T, two), two)
    calls = []
    tune_sigmas("euler", mixture, x_T, get_sigmas("logsnr", 3), objective=lambda x, r: calls.append(1) or 1.0,
                max_evals=10)
    assert 0 < len(calls) <= 14


@pytest.mark.parametrize("solver, sigmas, options, match", [
    ("dpmpp_2m", [80.0, 1.0, 2.0, 0.002], {}, "strictly decreasing"),
    ("dpmpp_2m", [80.0, float("nan"), 0.002], {}, "strictly decreasing"),
    ("dpmpp_2m", [80.0, 1.0, 0.0], {}, "> 0"),
    ("heun", [80.0, 1.0, 0.1, 0.002], {"nfe": 5}, "makes 6 denoiser calls"),
    ("unipc", [80.0, 0.002], {"order": 3}, "needs at least 3 steps"),
    ("dpmpp_2m", [80.0, 1.0, 0.002], {"orderr": 2}, "unknown option"),
    ("edm_stochastic", [80.0, 1.0, 0.002], {}, "stochastic"),
    ("rk45", [80.0, 1.0, 0.002], {}, "unknown solver"),
    ("dpmpp_2m", [80.0, 1.0, 0.002], {"objective": "lpips"}, "unknown objective"),
    ("dpmpp_2m", [80.0, 1.0, 0.002], {"objective": "fd_data"}, "needs data="),
])
def test_bad_input_is_one_clear_error(mixture, solver, sigmas, options, match):
    with pytest.raises(ValueError, match=match):
        tune_sigmas(solver, mixture, _noise(2, 0), torch.tensor(sigmas, dtype=torch.float64), **options)


def test_bad_batch_is_one_clear_error(mixture):
    sigmas = get_sigmas("logsnr", 3)
    with pytest.raises(ValueError, match="non-empty"):
        tune_sigmas("dpmpp_2m", mixture, torch.zeros(0, 64, dtype=torch.float64), sigmas)
    with pytest.raises(ValueError, match="non-finite"):
        tune_sigmas("dpmpp_2m", mixture, torch.full((2, 64), math.inf, dtype=torch.float64), sigmas)
    with pytest.raises(ValueError, match="reference"):
        tune_sigmas("dpmpp_2m", mixture, _noise(2, 0), sigmas, reference=torch.zeros(3, 64, dtype=torch.float64))
