import inspect
import itertools
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.solvers import SOLVERS, STOCHASTIC, nfe, seeded_noise, solve
from evodiff_pl.toy import GaussianMixture

DATA = Path(__file__).parent / "data"

NAMES = list(SOLVERS)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def _noise(name: str, seeds) -> dict:
    """noise= for a stochastic solver (sample r draws from seed seeds[r]); nothing for the others."""
    return {"noise": seeded_noise(torch.as_tensor(seeds))} if name in STOCHASTIC else {}


def _recorded(z: np.ndarray):
    """A noise source replaying recorded draws, one per call."""
    draws = iter(torch.tensor(z))
    return lambda x: next(draws)


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
        ("dpmpp_3m", "dpmpp_3m", {"lower_order_final": True}),
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


@pytest.mark.parametrize(
    "name, options, order, tol",
    [
        ("euler", {}, 1.0, 0.1),
        ("heun", {}, 2.0, 0.3),
        ("dpmpp_2m", {}, 2.0, 0.3),
        # UniC raises UniP's order p to p + 1 (UniPC Thm. 3.1)
        ("unipc", {"order": 1}, 2.0, 0.3),
        ("unipc", {"order": 2}, 3.0, 0.3),
        ("unipc", {"order": 3}, 4.0, 0.3),
        ("unipc", {"order": 3, "variant": "bh1"}, 4.0, 0.3),
        # the Euler warm-start step (local error O(h^2)) caps iPNDM's global order at 2 (docs/solvers_extra.md §2)
        ("ipndm", {"order": 4}, 2.0, 0.3),
        ("edm_stochastic", {"S_churn": 0.0}, 2.0, 0.3),
        ("dpmpp_2m_sde", {"eta": 0.0}, 2.0, 0.3),
        ("dpmpp_2m_sde", {"eta": 0.0, "solver_type": "heun"}, 2.0, 0.3),
    ],
)
def test_convergence_order(reference_mixture, convergence_problem, name, options, order, tol):
    x_T, exact = convergence_problem
    steps = [8, 16, 32, 64, 128]
    # median per-sample RMSE: a sample switching mixture component must not dominate the fit (docs/method.md §4)
    errs = [
        (solve(name, reference_mixture, x_T, get_sigmas("logsnr", n), **options) - exact)
        .square().mean(1).sqrt().median().item()
        for n in steps
    ]
    slope = -np.polyfit(np.log(steps), np.log(errs), 1)[0]
    print(f"{name} {options}: median RMSE {['%.2e' % e for e in errs]} at steps {steps}, order {slope:.3f}")
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
        if name == "unipc" and n_steps < 2:  # the default order 2 needs 2 steps
            options["order"] = 1
        calls.clear()
        solve(name, denoiser, x, get_sigmas("karras", n_steps), **options, **_noise(name, range(4)))
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
        out = solve(name, denoiser, x, get_sigmas(sched, n_steps), **options, **_noise(name, range(3)))
        assert torch.isfinite(out).all()


@pytest.mark.parametrize("n_steps", [10, 25])
@pytest.mark.parametrize("name", NAMES)
def test_samples_do_not_depend_on_their_batch(reference, reference_mixture, name, n_steps):
    x, sigmas, seeds = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", n_steps), torch.arange(32) + 100
    full = solve(name, reference_mixture, x, sigmas, **_noise(name, seeds))
    halves = [solve(name, reference_mixture, h, sigmas, **_noise(name, s)) for h, s in zip(x.chunk(2), seeds.chunk(2))]
    assert _rel(torch.cat(halves), full) < 1e-12


@pytest.mark.parametrize("name", NAMES)
def test_float32_is_close_to_float64(reference, reference_mixture, name):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", 10)
    x32 = solve(name, reference_mixture, x.float(), sigmas, **_noise(name, range(32)))
    assert x32.dtype == torch.float32
    assert _rel(x32.double(), solve(name, reference_mixture, x, sigmas, **_noise(name, range(32)))) < 1e-4


@pytest.mark.parametrize("shape", [(6, 4, 16), (6, 4, 4, 4)])
@pytest.mark.parametrize("name", NAMES)
def test_channels_are_independent_problems(small_mixture, name, shape):
    """(B, C, *spatial): inner products per sample and channel, so each channel is its own (B*C, D) problem."""

    def per_channel(x, sigma):
        flat = x.reshape(x.shape[0] * x.shape[1], -1)
        return small_mixture(flat, sigma.repeat_interleave(x.shape[1])).reshape(x.shape)

    x, sigmas = 80.0 * torch.randn(shape, dtype=torch.float64), get_sigmas("karras", 12)
    # the same draws in both layouts: a fixed pattern over the (contiguous) entries
    same = {"noise": lambda x: torch.cos(torch.arange(x.numel(), dtype=x.dtype)).reshape(x.shape)}
    same = same if name in STOCHASTIC else {}
    out = solve(name, per_channel, x, sigmas, **same)
    assert out.shape == x.shape
    flat = solve(name, small_mixture, x.reshape(shape[0] * shape[1], -1), sigmas, **same)
    assert _rel(out.reshape(flat.shape), flat) < 1e-12


@pytest.mark.parametrize("options", [{"denoise_to_zero": True}, {"denoise_to_zero": True, "lower_order_final": False}])
@pytest.mark.parametrize("name", NAMES)
def test_denoise_to_zero_returns_the_final_denoised_state(small_mixture, name, options):
    options = {k: v for k, v in options.items() if k in inspect.signature(SOLVERS[name]).parameters}
    x, sigmas = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64), get_sigmas("logsnr", 7)
    last = solve(name, small_mixture, x, sigmas, **{**options, "denoise_to_zero": False}, **_noise(name, range(4)))
    expected = small_mixture(last, sigmas[-1].expand(4))
    assert torch.equal(solve(name, small_mixture, x, sigmas, **options, **_noise(name, range(4))), expected)


@pytest.mark.parametrize("name", NAMES)
def test_callback_sees_every_step(small_mixture, name):
    seen = []
    x, sigmas = 80.0 * torch.randn(4, small_mixture.dim, dtype=torch.float64), get_sigmas("logsnr", 6)
    out = solve(name, small_mixture, x, sigmas, callback=lambda i, sigma, xi: seen.append((i, sigma, xi)),
                **_noise(name, range(4)))
    assert [(i, sigma) for i, sigma, _ in seen] == list(enumerate(sigmas.tolist()))[1:]
    assert torch.equal(seen[-1][2], out)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("name", NAMES)
def test_cuda_matches_cpu(reference, reference_mixture, name):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("logsnr", 10)
    gpu = solve(name, reference_mixture.cuda(), x.cuda(), sigmas, **_noise(name, range(32)))
    cpu = solve(name, reference_mixture.cpu(), x, sigmas, **_noise(name, range(32)))
    assert gpu.is_cuda and _rel(gpu.cpu(), cpu) < 1e-10


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
        nfe("unipcc", 4)
    with pytest.raises(TypeError, match="lower_order_final"):
        solve("euler", lambda x, s: x, x, sigmas, lower_order_final=True)
    with pytest.raises(TypeError, match="temperature"):
        nfe("evodiff", 4, temperature=0.25)


@pytest.fixture(scope="module")
def extra_reference() -> dict[str, np.ndarray]:
    """Endpoints (and fed noise) of the authors' UniPC, iPNDM, EDM Alg. 2, k-diffusion 2M SDE (tests/data/README.md)."""
    with np.load(DATA / "gmm_extra_solvers_official.npz") as f:
        return dict(f)


@pytest.mark.parametrize(
    "grid, variant, order, lower_order_final, denoise_to_zero",
    [("logsnr10", v, o, True, False) for v in ("bh1", "bh2") for o in (1, 2, 3)]
    + [("karras25", v, 3, False, False) for v in ("bh1", "bh2")]
    + [("karras7", "bh2", 3, True, True), ("karras7", "bh1", 2, False, False)],
)
def test_unipc_matches_the_authors_code(
    reference, reference_mixture, extra_reference, grid, variant, order, lower_order_final, denoise_to_zero
):
    key = f"unipc_{grid}_{variant}_order{order}" + ("" if lower_order_final else "_nolof")
    key += "_denoise_to_zero" if denoise_to_zero else ""
    x = solve("unipc", reference_mixture, torch.tensor(reference["x_T"][:64]),
              torch.tensor(extra_reference[f"unipc_{grid}_sigmas"]), order=order, variant=variant,
              lower_order_final=lower_order_final, denoise_to_zero=denoise_to_zero)
    err = _rel(x, torch.tensor(extra_reference[key]))
    print(f"{key}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-8


@pytest.mark.parametrize(
    "key",
    ["ipndm_logsnr10_order2", "ipndm_logsnr10_order3", "ipndm_logsnr10_order4", "ipndm_karras25_order2",
     "ipndm_karras25_order3", "ipndm_karras25_order4", "ipndm_karras25_order4_denoise_to_zero"],
)
def test_ipndm_matches_the_authors_code(reference, reference_mixture, extra_reference, key):
    grid, order = key.split("_")[1], int(key.split("_")[2][-1])
    x = solve("ipndm", reference_mixture, torch.tensor(reference["x_T"][:64]),
              torch.tensor(extra_reference[f"ipndm_{grid}_sigmas"]), order=order,
              denoise_to_zero=key.endswith("denoise_to_zero"))
    err = _rel(x, torch.tensor(extra_reference[key]))
    print(f"{key}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-8


@pytest.mark.parametrize("case", ["edm_karras11", "edm_karras21"])
def test_edm_stochastic_matches_edm_sampler_with_the_same_noise(reference, reference_mixture, extra_reference, case):
    """EDM's edm_sampler draws at every level and ends with an Euler step to 0 (= denoise_to_zero here);
    ours draws only on churned steps, so it is fed those draws."""
    sigmas = torch.tensor(extra_reference[f"{case}_sigmas"])
    churn, tmin, tmax, s_noise = extra_reference[f"{case}_options"].tolist()
    churned = ((sigmas[:-1] >= tmin) & (sigmas[:-1] <= tmax)).numpy()
    draws = _recorded(extra_reference[f"{case}_noise"][:-1][churned])
    x = solve("edm_stochastic", reference_mixture, torch.tensor(reference["x_T"][:64]), sigmas, S_churn=churn,
              S_tmin=tmin, S_tmax=tmax, S_noise=s_noise, noise=draws, denoise_to_zero=True)
    err = _rel(x, torch.tensor(extra_reference[f"{case}_denoise_to_zero"]))
    print(f"{case}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-8


@pytest.mark.parametrize(
    "case", ["sde_logsnr10_midpoint", "sde_logsnr10_heun", "sde_karras15_midpoint", "sde_karras15_heun_eta0"]
)
def test_dpmpp_2m_sde_matches_k_diffusion_with_the_same_noise(reference, reference_mixture, extra_reference, case):
    eta, s_noise = extra_reference[f"{case}_options"].tolist()
    x = solve("dpmpp_2m_sde", reference_mixture, torch.tensor(reference["x_T"][:64]),
              torch.tensor(extra_reference[f"{case}_sigmas"]), eta=eta, s_noise=s_noise,
              solver_type=case.split("_")[2], noise=_recorded(extra_reference[f"{case}_noise"]))
    err = _rel(x, torch.tensor(extra_reference[case]))
    print(f"{case}: relative error to the official endpoint {err:.2e}")
    assert err < 1e-8


def test_stochastic_solvers_without_noise_are_their_deterministic_counterparts(reference, reference_mixture):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("karras", 9)
    assert torch.equal(solve("edm_stochastic", reference_mixture, x, sigmas, S_churn=0.0),
                       solve("heun", reference_mixture, x, sigmas))
    sde = solve("dpmpp_2m_sde", reference_mixture, x, sigmas, eta=0.0)
    assert _rel(sde, solve("dpmpp_2m", reference_mixture, x, sigmas, lower_order_final=False)) < 1e-13


def test_unip_of_order_2_with_bh2_is_dpmpp_2m(reference, reference_mixture):
    x, sigmas = torch.tensor(reference["x_T"][:32]), get_sigmas("karras", 9)
    unip = solve("unipc", reference_mixture, x, sigmas, order=2, variant="bh2", corrector=False)
    assert _rel(unip, solve("dpmpp_2m", reference_mixture, x, sigmas)) < 1e-13


@pytest.mark.parametrize(
    "name, options, limit",
    [("edm_stochastic", {}, 0.015), ("edm_stochastic", {"S_tmin": 0.0, "S_tmax": math.inf, "S_noise": 1.0}, 0.01),
     ("dpmpp_2m_sde", {}, 0.02), ("dpmpp_2m_sde", {"solver_type": "heun"}, 0.02)],
)
def test_stochastic_solvers_sample_the_mixture(small_mixture, name, options, limit):
    """Fréchet distance of 4,096 samples (40 Karras steps) to the mixture, against the fitted statistics of
    4,096 fresh draws: measured 0.4-1.1e-2 (heun 5.0e-3, data vs data 1.9e-3, 2m_sde with s_noise 1.3: 3.4e-2)."""
    gen = torch.Generator().manual_seed(0)
    x_T = 80.0 * torch.randn(4096, small_mixture.dim, dtype=torch.float64, generator=gen)
    stats = gaussian_fit(small_mixture.sample(4096, gen))
    x = solve(name, small_mixture, x_T, get_sigmas("karras", 40), **options, **_noise(name, torch.arange(4096) + 10**6))
    fd = frechet_distance(*gaussian_fit(x), *stats)
    print(f"{name} {options}: FD {fd:.3e}")
    assert fd < limit


@pytest.mark.parametrize("name", ["dpmpp_2m", "dpmpp_3m", "unipc"])
def test_lower_order_final_auto_lowers_below_10_steps_only(reference, reference_mixture, name):
    x = torch.tensor(reference["x_T"][:16])
    for n_steps, same_as in ((9, True), (10, False)):
        sigmas = get_sigmas("logsnr", n_steps)
        auto = solve(name, reference_mixture, x, sigmas, lower_order_final="auto")
        assert torch.equal(auto, solve(name, reference_mixture, x, sigmas, lower_order_final=same_as))


def test_seeded_noise_draws_each_row_from_its_own_seed():
    noise = seeded_noise(torch.tensor([5, 9]))
    first, second = noise(torch.empty(2, 3, 4)), noise(torch.empty(2, 3, 4, dtype=torch.float64))
    g = torch.Generator().manual_seed(9)
    assert torch.equal(first[1], torch.randn(3, 4, generator=g))
    assert torch.equal(second[1], torch.randn(3, 4, generator=g).double()) and second.dtype == torch.float64
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        noise(torch.empty(3, 4))


@pytest.mark.parametrize(
    "name, options, error, match",
    [
        ("unipc", {"order": 4}, ValueError, "order=4"),
        ("unipc", {"order": 3}, ValueError, "at least 3 steps"),
        ("unipc", {"variant": "bh3"}, ValueError, "bh1, bh2"),
        ("unipc", {"lower_order_final": "sometimes"}, ValueError, "'auto'"),
        ("dpmpp_3m", {"lower_order_final": 1}, ValueError, "'auto'"),
        ("unipc", {"temperature": 1.0}, TypeError, "temperature"),
        ("ipndm", {"order": 5}, ValueError, "order=5"),
        ("ipndm", {"order": 0}, ValueError, "order=0"),
        ("edm_stochastic", {}, ValueError, "stochastic: pass noise="),
        ("edm_stochastic", {"S_churn": -1.0, "noise": lambda x: x}, ValueError, "S_churn >= 0"),
        ("edm_stochastic", {"S_tmin": 2.0, "S_tmax": 1.0, "noise": lambda x: x}, ValueError, "S_tmin <= S_tmax"),
        ("dpmpp_2m_sde", {}, ValueError, "stochastic: pass noise="),
        ("dpmpp_2m_sde", {"solver_type": "rk4", "noise": lambda x: x}, ValueError, "'midpoint' or 'heun'"),
        ("dpmpp_2m_sde", {"eta": -0.5, "noise": lambda x: x}, ValueError, "eta must be >= 0"),
    ],
)
def test_bad_options_raise_before_any_denoiser_call(small_mixture, name, options, error, match):
    calls = []
    x, sigmas = torch.randn(2, small_mixture.dim, dtype=torch.float64), get_sigmas("logsnr", 2)
    with pytest.raises(error, match=match):
        solve(name, lambda x, s: calls.append(s) or small_mixture(x, s), x, sigmas, **options)
    assert calls == []
    if error is ValueError and "noise=" not in match:
        with pytest.raises(ValueError, match=match):
            nfe(name, 2, **{k: v for k, v in options.items() if k != "noise"})
