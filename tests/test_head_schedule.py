"""The schedule read off an EDM2 log-variance head: with the optimal head of Gaussian data it is the exact-MMSE
schedule inside the trusted range and constant in q beyond; names, kinds and refusals."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from evodiff_pl.schedules.entropic import EntropicSchedule, edm_loss_weight
from evodiff_pl.schedules.head import head_schedule, trusted_range
from evodiff_pl.schedules.grids import from_head, get_sigmas, learned_kind

C = 0.7  # data N(0, C² I): per-dimension MMSE σ²C²/(σ²+C²)


def gaussian_mmse(sigma: torch.Tensor) -> torch.Tensor:
    return sigma**2 * C**2 / (sigma**2 + C**2)


class OptimalHead(nn.Module):
    """A stand-in EDM2 network whose head is the optimum of EDM2's loss: u(σ) = ln(λ(σ)·m(σ))."""

    sigma_data = 0.5

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(1))

    def logvar(self, sigma: torch.Tensor) -> torch.Tensor:
        return (edm_loss_weight(sigma, self.sigma_data) * gaussian_mmse(sigma)).log()


@pytest.mark.parametrize("kind", ["rescaled_entropic", "entropic"])
def test_optimal_head_gives_the_exact_mmse_schedule(kind):
    head = head_schedule(OptimalHead(), kind=kind, sigma_min=0.002, sigma_max=80.0, trusted=(0.002, 80.0), n_nodes=256)
    sigmas = torch.logspace(math.log10(0.002), math.log10(80.0), 512, dtype=torch.float64)
    exact = EntropicSchedule.from_mmse(sigmas, gaussian_mmse(sigmas), kind=kind)
    for n in (5, 10, 20):
        a, b = head.sigmas(n), exact.sigmas(n)
        assert (a.log() - b.log()).abs().max().item() < 2e-3  # linear interpolation of q on 256 vs 512 nodes
    assert head.source["method"] == "head"


def test_head_is_trusted_inside_the_training_range_and_constant_beyond():
    lo, hi = trusted_range(-0.4, 1.0, 0.002, 80.0)
    assert (lo, hi) == pytest.approx((math.exp(-2.9), math.exp(2.1)))  # ± 2.5 P_std
    assert trusted_range(-0.4, 3.0, 0.002, 80.0) == (0.002, 80.0)  # clipped to the sampling range
    head = head_schedule(OptimalHead(), kind="rescaled_entropic", sigma_min=0.002, sigma_max=80.0, trusted=(lo, hi))
    assert head.sigma_range == (0.002, 80.0)
    inside = torch.tensor([lo * 1.01, 0.5, 1.0, hi / 1.01], dtype=torch.float64)
    q_in = head.mmse(inside) * edm_loss_weight(inside)
    assert torch.allclose(q_in, edm_loss_weight(inside) * gaussian_mmse(inside), rtol=1e-3)
    for end, beyond in ((lo, [0.002, 0.01, lo / 1.5]), (hi, [hi * 1.5, 20.0, 80.0])):
        e = torch.tensor(end, dtype=torch.float64)
        q_end = edm_loss_weight(e) * gaussian_mmse(e)
        s = torch.tensor(beyond, dtype=torch.float64)
        assert torch.allclose(head.mmse(s) * edm_loss_weight(s), q_end.expand(3), rtol=1e-9)


def test_head_schedule_names_and_refusals():
    assert from_head("head_entropic") and not from_head("rescaled_entropic")
    assert learned_kind("head_rescaled_entropic") == "rescaled_entropic" == learned_kind("rescaled_entropic")
    head = head_schedule(OptimalHead(), kind="rescaled_entropic", sigma_min=0.002, sigma_max=80.0, trusted=(0.1, 5.0))
    assert torch.equal(get_sigmas("head_rescaled_entropic", 10, schedule=head), head.sigmas(10))
    with pytest.raises(ValueError, match="'head_entropic' was asked for but the given schedule is 'rescaled_entropic'"):
        get_sigmas("head_entropic", 10, schedule=head)
    with pytest.raises(ValueError, match="needs a network with a log-variance head"):
        head_schedule(nn.Linear(2, 2), kind="entropic", sigma_min=0.002, sigma_max=80.0, trusted=(0.1, 5.0))
    with pytest.raises(ValueError, match="does not meet"):
        trusted_range(10.0, 1.0, 0.002, 80.0)
