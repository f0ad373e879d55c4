import math

import pytest
import torch

from evodiff_pl.schedules.grids import get_sigmas


@pytest.mark.parametrize("name", ["karras", "logsnr"])
@pytest.mark.parametrize("n", [1, 5, 10, 79])
def test_grid_shape_ends_and_order(name, n):
    s = get_sigmas(name, n, sigma_min=0.002, sigma_max=80.0)
    assert s.dtype == torch.float64 and s.shape == (n + 1,)
    assert s[0].item() == 80.0 and s[-1].item() == 0.002
    assert (s[1:] < s[:-1]).all()


def test_karras_matches_edm_formula():
    n, rho = 18, 7.0
    s = get_sigmas("karras", n, rho=rho)
    i = 5
    expected = (80.0 ** (1 / rho) + i / n * (0.002 ** (1 / rho) - 80.0 ** (1 / rho))) ** rho
    assert s[i].item() == pytest.approx(expected, rel=1e-14)


def test_logsnr_is_uniform_in_log_sigma(reference):
    s = get_sigmas("logsnr", 10)
    steps = s.log().diff()
    assert torch.allclose(steps, torch.full_like(steps, math.log(0.002 / 80.0) / 10), atol=1e-13)
    assert torch.allclose(s, torch.tensor(reference["sigmas"]), rtol=1e-14)


def test_errors():
    with pytest.raises(ValueError, match="karras, logsnr"):
        get_sigmas("cosine", 10)
    with pytest.raises(ValueError, match="schedule="):
        get_sigmas("rescaled_entropic", 10)
    with pytest.raises(ValueError, match="sigma_min"):
        get_sigmas("karras", 10, sigma_min=1.0, sigma_max=0.5)
    with pytest.raises(ValueError, match="n_steps"):
        get_sigmas("karras", 0)
