import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evodiff_pl.schedules import get_sigmas
from evodiff_pl.solvers import SOLVERS, nfe, solve
from evodiff_pl.toy import GaussianMixture

DATA = Path(__file__).parent / "data"

NAMES = list(SOLVERS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _option_grid(name: str) -> list[dict]:
    """Every combination of the solver's boolean options."""
    flags = [k for k, p in inspect.signature(SOLVERS[name]).parameters.items() if isinstance(p.default, bool)]
    return [dict(zip(flags, v)) for v in itertools.product([False, True], repeat=len(flags))]


@pytest.fixture(scope="module")
def small_mixture() -> GaussianMixture:
    return GaussianMixture.default(dim=16, n_components=4, seed=1)


@pytest.mark.parametrize(
    "key, name, options",
    [
        ("evodiff", "evodiff", {}),
        ("dpmpp_2m", "dpmpp_2m", {}),
        ("dpmpp_3m", "dpmpp_3m", {}),
        ("evodiff_denoise_to_zero", "evodiff", {"denoise_to_zero": True}),
    ],
)
def test_matches_official_reference(reference, reference_mixture, key, name, options):
    sigmas = reference[f"{key}_sigmas" if f"{key}_sigmas" in reference else "sigmas"]
    x = solve(name, reference_mixture, torch.tensor(reference["x_T"]), torch.tensor(sigmas), **options)
    err = _rel(x, torch.tensor(reference[key]))
    print(f"{key}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-8


@pytest.mark.parametrize(
    "case, denoise_to_zero",
    [("karras_n10", False), ("karras_n10", True), ("karras_n25", False), ("logsnr_n25", False),
     ("rescaled_entropic_n8", False), ("rescaled_entropic_n30", False)],
)
def test_evodiff_matches_official_code_off_the_logsnr_grid(reference, reference_mixture, case, denoise_to_zero):
    """Non-uniform grids and N > 20 exercise b, tau, the zeta rule and the final step (tests/data/README.md)."""
    key = f"{case}_evodiff" + ("_denoise_to_zero" if denoise_to_zero else "")
    with np.load(DATA / "gmm_evodiff_official_grids.npz") as f:
        sigmas, expected = torch.tensor(f[f"{case}_sigmas"]), torch.tensor(f[key])
    x_T = torch.tensor(reference["x_T"][: len(expected)])
    err = _rel(solve("evodiff", reference_mixture, x_T, sigmas, denoise_to_zero=denoise_to_zero), expected)
    print(f"{key}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-9


@pytest.fixture(scope="module")
def convergence_problem(reference, reference_mixture):
    x_T = torch.tensor(reference["x_T"][:64])
    # RK4 with 500 steps is ~1e-8 accurate here, far below the solver errors measured below.
    return x_T, reference_mixture.ode_solve(x_T, 80.0, 0.002, n_steps=500)


@pytest.mark.parametrize("name, order, tol", [("euler", 1.0, 0.1), ("heun", 2.0, 0.3), ("dpmpp_2m", 2.0, 0.3)])
def test_convergence_order(reference_mixture, convergence_problem, name, order, tol):
    x_T, exact = convergence_problem
    steps = [8, 16, 32, 64, 128]
    # median per-sample RMSE: a sample switching mixture component must not dominate the fit (docs/method.md §4)
    errs = [
        (solve(name, reference_mixture, x_T, get_sigmas("logsnr", n)) - exact).square().mean(1).sqrt().median().item()
        for n in steps
    ]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f"{name}: median RMSE {['%.2e' % e for e in errs]} at steps {steps}, order {slope:.3f}")
    assert abs(slope - order) < tol


@pytest.mark.parametrize("n_steps", [1, 2, 3, 5, 21])
@pytest.mark.parametrize("name", NAMES)
def test_nfe_counts_denoiser_calls(small_mixture, name, n_steps):
    if name == "evodiff" and n_steps < 2:
        pytest.skip("evodiff needs 2 steps")
    calls = []

    def denoiser(x, sigma):
        calls.append(sigma)
        assert sigma.shape == (x.shape[0],) and sigma.dtype == x.dtype
        return small_mixture(x, sigma)

    x = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64)
    for options in _option_grid(name):
        calls.clear()
        solve(name, denoiser, x, get_sigmas("karras", n_steps), **options)
        assert len(calls) == nfe(name, n_steps, **options), options


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("n_steps", [6, 25])
@pytest.mark.parametrize("output", ["zeros", "constant"])
@pytest.mark.parametrize("name", NAMES)
def test_degenerate_denoisers_give_finite_results(name, output, n_steps, dtype):
    c = torch.linspace(-1, 1, 8, dtype=dtype)

    def denoiser(x, sigma):
        return torch.zeros_like(x) if output == "zeros" else c.expand_as(x)

    x = 80.0 * torch.randn(3, 8, dtype=dtype)
    for sched, options in itertools.product(["karras", "logsnr"], _option_grid(name)):
        assert torch.isfinite(solve(name, denoiser, x, get_sigmas(sched, n_steps), **options)).all()


@pytest.mark.parametrize("n_steps", [10, 25])
@pytest.mark.parametrize("name", NAMES)
def test_samples_do_not_depend_on_their_batch(reference, reference_mixture, name, n_steps):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", n_steps)
    full = solve(name, reference_mixture, x, sigmas)
    halves = torch.cat([solve(name, reference_mixture, h, sigmas) for h in x.chunk(2)])
    assert _rel(halves, full) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_float32_is_close_to_float64(reference, reference_mixture, name):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", 10)
    x32 = solve(name, reference_mixture, x.float(), sigmas)
    assert x32.dtype == torch.float32
    assert _rel(x32.double(), solve(name, reference_mixture, x, sigmas)) < 1e-4


@pytest.mark.parametrize("shape", [(6, 4, 16), (6, 4, 4, 4)])
@pytest.mark.parametrize("name", NAMES)
def test_channels_are_independent_problems(small_mixture, name, shape):
    """(B, C, *spatial): inner products per sample and channel, so each channel is its own (B*C, D) problem."""

    def per_channel(x, sigma):
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        return small_mixture(flat, sigma.repeat_interleave(x.shape[1])).reshape(x.shape)

    x, sigmas = 80.0 * torch.randn(shape, dtype=torch.float64), get_sigmas("karras", 12)
    out = solve(name, per_channel, x, sigmas)
    assert out.shape == x.shape
    flat = solve(name, small_mixture, x.reshape(shape[0] * shape[1], -1), sigmas)
    assert _rel(out.reshape(flat.shape), flat) < 1e-12


@pytest.mark.parametrize("options", [{"denoise_to_zero": True}, {"denoise_to_zero": True, "lower_order_final": False}])
@pytest.mark.parametrize("name", NAMES)
def test_denoise_to_zero_returns_the_final_denoised_state(small_mixture, name, options):
    options = {k: v for k, v in options.items() if k in inspect.signature(SOLVERS[name]).parameters}
    x, sigmas = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64), get_sigmas("logsnr", 7)
    last = solve(name, small_mixture, x, sigmas, **{**options, "denoise_to_zero": False})
    expected = small_mixture(last, sigmas[-1].expand(4))
    assert torch.equal(solve(name, small_mixture, x, sigmas, **options), expected)


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step(small_mixture, name):
    seen = []
    x, sigmas = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64), get_sigmas("logsnr", 6)
    out = solve(name, small_mixture, x, sigmas, callback=lambda i, sigma, xi: seen.append((i, sigma, xi)))
    assert [(i, sigma) for i, sigma, _ in seen] == list(enumerate(sigmas.tolist()))[1:]
    assert torch.equal(seen[-1][2], out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(reference, reference_mixture, name):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", 10)
    gpu = solve(name, reference_mixture.cuda(), x.cuda(), sigmas)
    assert gpu.is_cuda and _rel(gpu.cpu(), solve(name, reference_mixture.cpu(), x, sigmas)) < 1e-10


@pytest.mark.parametrize("order", [1, 3])
def test_evodiff_order_other_than_2_raises(small_mixture, order):
    x = torch.randn(2, small_mixture.dim, dtype=torch.float64)
    with pytest.raises(ValueError, match="2"):
        solve("evodiff", small_mixture, x, get_sigmas("logsnr", 5), order=order)
    with pytest.raises(ValueError, match="2"):
        nfe("evodiff", 5, order=order)


def test_evodiff_needs_two_steps(small_mixture):
    with pytest.raises(ValueError, match="at least 2 steps"):
        solve("evodiff", small_mixture, torch.randn(2, small_mixture.dim), get_sigmas("logsnr", 1))


@pytest.mark.parametrize(
    "sigmas",
    [
        torch.tensor([80.0]),
        torch.tensor([[80.0, 1.0]]),
        torch.tensor([1.0, 80.0]),
        torch.tensor([80.0, 1.0, 1.0]),
        torch.tensor([80.0, 1.0, 0.0]),
        torch.tensor([80.0, -1.0]),
        torch.tensor([80.0, math.nan, 1.0]),
        torch.tensor([math.inf, 1.0]),
    ],
    ids=["one-level", "2-d", "increasing", "repeated", "trailing-zero", "negative", "nan", "inf"],
)
@pytest.mark.parametrize("name", NAMES)
def test_bad_sigmas_raise(name, sigmas):
    with pytest.raises(ValueError, match="sigmas"):
        solve(name, lambda x, s: x, torch.randn(2, 3), sigmas)


def test_unknown_names_and_options_raise():
    x, sigmas = torch.randn(2, 3), get_sigmas("logsnr", 4)
    with pytest.raises(ValueError, match="dpmpp_2m"):
        solve("dpm", lambda x, s: x, x, sigmas)
    with pytest.raises(ValueError, match="evodiff"):
        nfe("unipc", 4)
    with pytest.raises(TypeError, match="lower_order_final"):
        solve("euler", lambda x, s: x, x, sigmas, lower_order_final=True)
    with pytest.raises(TypeError, match="temperature"):
        nfe("evodiff", 4, temperature=0.25)
