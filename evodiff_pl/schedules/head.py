"""The entropic schedule read off an EDM2 network's log-variance head (schedules `head_entropic`,
`head_rescaled_entropic`).

EDM2's loss per element, (λ(σ)/e^{u(σ)})·(D − x0)² + u(σ), is minimised over u at e^{u(σ)} = λ(σ)·E(D − x0)²,
the curve q(σ) = λ(σ)·m(σ) that the loss tracker estimates (docs/method.md §3). So a trained head gives the
schedule with no data and no sampling pass: q is e^u on a ln σ grid over the range the loss trained on, and
constant beyond it (as the tracker's curve), since the head sees few samples there (docs/edm2_training.md).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from evodiff_pl.schedules.entropic import EntropicSchedule
from evodiff_pl.networks.precond import has_logvar_head

TRUST_STDS = 2.5
"""The head is trusted on ln σ ∈ P_mean ± TRUST_STDS·P_std: 98.8 % of the training noise levels (one in 160 lies
beyond each end). On the mixture (benchmarks/head_schedule_gmm.py) 2 cuts the upper end off where q still rises and
3 or more lets in the head's poorly trained small-σ end; 2.5 gave the closest grids there."""


def trusted_range(P_mean: float, P_std: float, sigma_min: float, sigma_max: float,
                  k: float = TRUST_STDS) -> tuple[float, float]:
    """exp(P_mean ± k·P_std) clipped to [sigma_min, sigma_max]."""
    lo, hi = max(math.exp(P_mean - k * P_std), sigma_min), min(math.exp(P_mean + k * P_std), sigma_max)
    if not lo < hi:
        raise ValueError(f"the trusted range exp({P_mean} ± {k}·{P_std}) does not meet [{sigma_min}, {sigma_max}]")
    return lo, hi


@torch.no_grad()
def head_schedule(
    net: nn.Module,
    *,
    kind: str,
    sigma_min: float,
    sigma_max: float,
    trusted: tuple[float, float],
    dim: int | None = None,
    n_nodes: int = 128,
    source: dict[str, Any] | None = None,
) -> EntropicSchedule:
    """The `kind` schedule of `net`'s head: q = e^{u(σ)} at `n_nodes` levels uniform in ln σ over `trusted`,
    constant beyond; defined on [sigma_min, sigma_max]. ValueError if `net` has no log-variance head."""
    if not has_logvar_head(net):
        raise ValueError(f"the head_{kind} schedule needs a network with a log-variance head (EDM2, "
                         f"model.precond=edm2); {type(net).__name__} has none")
    log_sigma = torch.linspace(math.log(trusted[0]), math.log(trusted[1]), n_nodes, dtype=torch.float64)
    device = next(net.parameters()).device
    # q(σ) = e^{u(σ)} = λ(σ)·m(σ) at the optimum of EDM2's loss (eq. (21))
    q = net.logvar(log_sigma.exp().to(device)).double().cpu().exp()
    info = {"method": "head", "trusted": list(trusted), "n_nodes": n_nodes, **(source or {})}
    return EntropicSchedule(log_sigma, q, kind=kind, sigma_data=float(net.sigma_data), dim=dim,
                            sigma_range=(sigma_min, sigma_max), source=info)


def head_schedule_of_checkpoint(net: nn.Module, meta: dict[str, Any], kind: str) -> EntropicSchedule:
    """`head_schedule` of a loaded checkpoint's network, trusted range from its config's loss.P_mean / P_std."""
    loss = meta["config"]["loss"]
    trusted = trusted_range(loss["P_mean"], loss["P_std"], meta["sigma_min"], meta["sigma_max"])
    return head_schedule(net, kind=kind, sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"], trusted=trusted,
                         dim=math.prod(meta["sample_shape"]), source={"images_seen": meta.get("images_seen")})
