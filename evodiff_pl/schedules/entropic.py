"""Entropic-time sampling schedules learned from a denoiser's per-level error (docs/method.md §3).

The error curve comes from the training loss (`evodiff_pl.schedules.tracker.SigmaBinnedLoss`) or from
`estimate_mmse`, the paper's dedicated estimation pass for any denoiser `D(x, sigma)`; `EntropicSchedule` turns
either curve into sampling grids, `sigmas(n_steps, sigma_min, sigma_max)`, and
  saves itself as a small JSON file that `evodiff_pl.schedules.grids.get_sigmas` consumes.

The curve is held as q(sigma) = lambda(sigma) * m(sigma): the per-dimension MMSE m relative to the MMSE of
Gaussian data N(0, sigma_data^2 I). q is what the EDM loss measures, it is flat in both tails, and it is
interpolated linearly in ln sigma and extended as a constant beyond the estimated range.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Callable, Union

import torch
import torch.distributed as dist
from torch import Tensor
from tqdm.auto import tqdm

from evodiff_pl.schedules.tracker import SigmaBinnedLoss
from evodiff_pl.utils.dist import all_reduce, world
from evodiff_pl.utils.fileio import atomic_write_json
from evodiff_pl.utils.stop import stoppable
from evodiff_pl.schedules.grids import get_sigmas

__all__ = ["KINDS", "EntropicSchedule", "edm_loss_weight", "estimate_mmse"]

KINDS = ("entropic", "rescaled_entropic")
_KIND_ALIASES = {"entropic": "entropic", "rescaled_entropic": "rescaled_entropic", "rescaled": "rescaled_entropic"}
_SCHEDULE_FORMAT = "evodiff-pl/entropic-schedule"
_VERSION = 1
_N_GRID = 4096


def edm_loss_weight(sigma: Tensor, sigma_data: float = 0.5) -> Tensor:
    """lambda(sigma) = (sigma^2 + sigma_d^2) / (sigma * sigma_d)^2, the EDM loss weight (= 1 / c_out^2)."""
    # Karras et al. 2022, eq. (8) / Table 1; docs/method.md §1
    return (sigma.square() + sigma_data**2) / (sigma * sigma_data).square()


def _interp(x: Tensor, xp: Tensor, fp: Tensor) -> Tensor:
    """Piecewise-linear interpolation of (xp, fp) at x, constant beyond the ends (numpy.interp); xp increasing."""
    idx = torch.searchsorted(xp, x, right=True).clamp(1, xp.numel() - 1)
    x0, x1, f0, f1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    t = torch.where(x1 > x0, (x - x0) / (x1 - x0), torch.zeros_like(x)).clamp(0.0, 1.0)
    return f0 + t * (f1 - f0)


def _strictly_decreasing(sigmas: Tensor) -> Tensor:
    """Nudge colliding interior levels by single ulps so that sigma_0 > sigma_1 > ... > sigma_N (ends fixed)."""
    if bool((sigmas[1:] < sigmas[:-1]).all()):
        return sigmas
    s = sigmas.clone()
    zero, inf = torch.zeros((), dtype=s.dtype), torch.full((), math.inf, dtype=s.dtype)
    for j in range(1, s.numel() - 1):
        if s[j] >= s[j - 1]:
            s[j] = torch.nextafter(s[j - 1], zero)
    for j in range(s.numel() - 2, 0, -1):
        if s[j] <= s[j + 1]:
            s[j] = torch.nextafter(s[j + 1], inf)
    if not bool((s[1:] < s[:-1]).all()):
        raise ValueError(f"cannot place {s.numel()} distinct float64 levels in [{s[-1].item()}, {s[0].item()}]")
    return s


class EntropicSchedule:
    """A learned (rescaled) entropic-time schedule from a per-level error curve (Stancevic et al. 2025; docs/method.md §3).

    The curve is q at strictly increasing ln sigma nodes; q is interpolated linearly in ln sigma and held
    constant beyond the nodes, m = q / lambda(sigma), and the schedule's rate per unit ln sigma is
    dim * m / sigma^2 (kind "entropic") or dim * m / sigma (kind "rescaled_entropic"). `sigma_range` is the
    range the curve was estimated on; `check_sigma_range` lets a consumer refuse a mismatch.
    """

    def __init__(
        self,
        log_sigma: Tensor,
        q: Tensor,
        *,
        kind: str = "rescaled_entropic",
        sigma_data: float = 0.5,
        dim: int | None = None,
        sigma_range: tuple[float, float] | None = None,
        source: dict[str, Any] | None = None,
    ) -> None:
        if kind not in _KIND_ALIASES:
            raise ValueError(f"unknown kind {kind!r}; valid: {', '.join(KINDS)} (or 'rescaled')")
        log_sigma = torch.as_tensor(log_sigma, dtype=torch.float64).detach().cpu().reshape(-1)
        q = torch.as_tensor(q, dtype=torch.float64).detach().cpu().reshape(-1)
        if log_sigma.shape != q.shape or log_sigma.numel() < 2:
            raise ValueError(f"need >= 2 matching nodes, got ln sigma {tuple(log_sigma.shape)} and q {tuple(q.shape)}")
        if not bool(torch.isfinite(log_sigma).all()) or not bool((log_sigma[1:] > log_sigma[:-1]).all()):
            raise ValueError("ln sigma nodes must be finite and strictly increasing")
        bad = ~(torch.isfinite(q) & (q > 0))
        if bool(bad.any()):
            at = ", ".join(f"{s:.4g}" for s in log_sigma[bad].exp().tolist()[:8])
            raise ValueError(f"the error curve must be finite and > 0; bad values at sigma = {at}")
        if not sigma_data > 0:
            raise ValueError(f"sigma_data must be > 0, got {sigma_data}")
        if dim is not None and (not isinstance(dim, int) or dim < 1):
            raise ValueError(f"dim must be a positive integer or None, got {dim!r}")
        lo, hi = (math.exp(log_sigma[0].item()), math.exp(log_sigma[-1].item())) if sigma_range is None else sigma_range
        if not 0 < lo < hi:
            raise ValueError(f"sigma_range must satisfy 0 < min < max, got {sigma_range}")
        self.kind = _KIND_ALIASES[kind]
        self.log_sigma, self.q = log_sigma, q
        self.sigma_data, self.dim = float(sigma_data), dim
        self.sigma_range = (float(lo), float(hi))
        self.source = dict(source or {})

    @classmethod
    def from_mmse(
        cls,
        sigmas: Tensor,
        mmse_per_dim: Tensor,
        *,
        kind: str = "rescaled_entropic",
        dim: int | None = None,
        sigma_data: float = 0.5,
        source: dict[str, Any] | None = None,
    ) -> "EntropicSchedule":
        """From a per-dimension MMSE curve m(sigma) at strictly monotone sigmas (either order), e.g. `estimate_mmse`.

        The curve is stored as q = lambda(sigma) * m and interpolated linearly in ln sigma like a loss curve;
        `sigma_data` only sets that reparametrisation (and the tail extension), any positive value works.
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64).detach().cpu().reshape(-1)
        m = torch.as_tensor(mmse_per_dim, dtype=torch.float64).detach().cpu().reshape(-1)
        if sigmas.shape != m.shape:
            raise ValueError(f"sigmas {tuple(sigmas.shape)} and mmse_per_dim {tuple(m.shape)} must match")
        if not bool((sigmas > 0).all()):
            raise ValueError("sigmas must be > 0")
        if sigmas.numel() > 1 and sigmas[0] > sigmas[-1]:
            sigmas, m = sigmas.flip(0), m.flip(0)
        if not bool((sigmas[1:] > sigmas[:-1]).all()):
            raise ValueError("sigmas must be strictly monotone")
        if not bool((torch.isfinite(m) & (m > 0)).all()):
            raise ValueError("mmse_per_dim must be finite and > 0")
        info = {"method": "mmse", "n_levels": sigmas.numel(), **(source or {})}
        # q = lambda(sigma) * m  (docs/method.md §3)
        q = edm_loss_weight(sigmas, sigma_data) * m
        return cls(sigmas.log(), q, kind=kind, sigma_data=sigma_data, dim=dim,
                   sigma_range=(sigmas[0].item(), sigmas[-1].item()), source=info)

    @classmethod
    def from_loss_stats(
        cls,
        tracker: SigmaBinnedLoss,
        *,
        kind: str = "rescaled_entropic",
        sigma_data: float | None = None,
        dim: int | None = None,
        min_count: float = 64.0,
        min_populated_bins: int = 4,
        source: dict[str, Any] | None = None,
    ) -> "EntropicSchedule":
        """From the binned training loss (the last synced statistics of `tracker`).

        Consecutive bins are pooled from small to large sigma until each node holds >= `min_count` (effective)
        samples; a remainder at the large-sigma end joins the last node. Each node's q is its pooled mean, placed
        at the count-weighted mean ln sigma of its bin centres; empty bins are skipped. So the sparse tails of the
        training distribution are estimated from all their samples, not from single noisy bins.
        `sigma_data` defaults to the tracker's. Raises ValueError when fewer than `min_populated_bins` nodes
        result or a node's q is not finite and positive.
        """
        if not min_count > 0:
            raise ValueError(f"min_count must be > 0, got {min_count}")
        centres = tracker.bin_centers().log().tolist()
        nodes: list[list[float]] = []
        acc = [0.0, 0.0, 0.0]
        for x, total, count in zip(centres, tracker.sums().tolist(), tracker.counts().tolist()):
            if count > 0:
                acc = [acc[0] + count * x, acc[1] + total, acc[2] + count]
            if acc[2] >= min_count:
                nodes.append(acc)
                acc = [0.0, 0.0, 0.0]
        if nodes and acc[2] > 0:
            nodes[-1] = [a + b for a, b in zip(nodes[-1], acc)]
        need = max(min_populated_bins, 2)
        if len(nodes) < need:
            raise ValueError(f"the {tracker.n_bins} loss bins hold {tracker.counts().sum().item():.6g} samples in "
                             f"{len(nodes)} groups of >= {min_count:g}; need at least {need} groups to estimate an "
                             "entropic schedule (train longer: more samples in the loss bins)")
        x, total, count = torch.tensor(nodes, dtype=torch.float64).unbind(1)
        log_sigma, q = x / count, total / count
        bad = ~(torch.isfinite(q) & (q > 0))
        if bool(bad.any()):
            at = ", ".join(f"{s:.4g}" for s in log_sigma[bad].exp().tolist()[:8])
            raise ValueError(f"the binned training loss is not finite and positive at sigma = {at}")
        info = {"method": "training_loss", "n_bins": tracker.n_bins, "min_count": min_count, "nodes": len(nodes),
                "ema_decay": tracker.ema_decay, "updates": tracker.steps,
                "effective_samples": count.sum().item(), **(source or {})}
        return cls(log_sigma, q, kind=kind, sigma_data=tracker.sigma_data if sigma_data is None else sigma_data,
                   dim=dim, sigma_range=(tracker.sigma_min, tracker.sigma_max), source=info)

    def mmse(self, sigma: Tensor | float) -> Tensor:
        """Per-dimension MMSE m(sigma) = q(ln sigma) / lambda(sigma) of the stored curve, float64."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        # m = q / lambda(sigma)  (docs/method.md §3)
        return _interp(s.log(), self.log_sigma, self.q) / edm_loss_weight(s, self.sigma_data)

    def rate(self, sigma: Tensor | float) -> Tensor:
        """dH/d ln sigma = dim m/sigma^2 (entropic) or dR/d ln sigma = dim m/sigma (rescaled); dim = 1 if None."""
        s = torch.as_tensor(sigma, dtype=torch.float64)
        # docs/method.md §3: dH/dln sigma = dim m / sigma^2, dR/dln sigma = dim m / sigma
        r = self.mmse(s) / (s.square() if self.kind == "entropic" else s)
        return r * (self.dim or 1)

    def tau(self, sigma: Tensor | float, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
        """The normalised time tau(sigma) in [0, 1] over [sigma_min, sigma_max] (trapezoid rule on a fine grid)."""
        u, t = self._tau_grid(sigma_min, sigma_max)
        return _interp(torch.as_tensor(sigma, dtype=torch.float64).log(), u, t)

    def _tau_grid(self, sigma_min: float, sigma_max: float) -> tuple[Tensor, Tensor]:
        if not 0 < sigma_min < sigma_max:
            raise ValueError(f"need 0 < sigma_min < sigma_max, got sigma_min={sigma_min}, sigma_max={sigma_max}")
        u = torch.linspace(math.log(sigma_min), math.log(sigma_max), _N_GRID, dtype=torch.float64)
        r = self.rate(u.exp())
        # cumulative trapezoid of the rate in ln sigma, normalised to [0, 1]  (docs/method.md §3)
        t = torch.cat([r.new_zeros(1), torch.cumsum(0.5 * (r[1:] + r[:-1]) * u.diff(), 0)])
        return u, t / t[-1]

    def sigmas(self, n_steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0) -> Tensor:
        """n_steps + 1 strictly decreasing float64 levels at uniform tau_j = 1 - j/n_steps, both ends exact.

        tau is the trapezoid integral of `rate` on 4096 points uniform in ln sigma over [sigma_min, sigma_max],
        inverted by linear interpolation of ln sigma; colliding levels are separated by single ulps.
        """
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive integer, got {n_steps!r}")
        u, t = self._tau_grid(sigma_min, sigma_max)
        target = 1.0 - torch.arange(n_steps + 1, dtype=torch.float64) / n_steps
        s = _interp(target, t, u).exp()
        s[0], s[-1] = sigma_max, sigma_min
        return _strictly_decreasing(s)

    def check_sigma_range(self, sigma_min: float, sigma_max: float, rtol: float = 1e-6) -> None:
        """Raise ValueError unless [sigma_min, sigma_max] is the range the curve was estimated on."""
        lo, hi = self.sigma_range
        if not (math.isclose(sigma_min, lo, rel_tol=rtol) and math.isclose(sigma_max, hi, rel_tol=rtol)):
            raise ValueError(f"the {self.kind} schedule was estimated on sigma in [{lo}, {hi}], "
                             f"not [{sigma_min}, {sigma_max}]")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; floats round-trip exactly."""
        return {"format": _SCHEDULE_FORMAT, "version": _VERSION, "kind": self.kind, "sigma_data": self.sigma_data,
                "dim": self.dim, "sigma_range": list(self.sigma_range), "log_sigma": self.log_sigma.tolist(),
                "q": self.q.tolist(), "source": self.source}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "EntropicSchedule":
        """Inverse of `to_dict`; a dict of another format raises ValueError."""
        if not isinstance(d, dict) or d.get("format") != _SCHEDULE_FORMAT:
            raise ValueError(f"not an entropic schedule (expected format {_SCHEDULE_FORMAT!r})")
        if d.get("version") != _VERSION:
            raise ValueError(f"unsupported entropic schedule version {d.get('version')!r} (this code reads {_VERSION})")
        missing = [k for k in ("kind", "sigma_data", "dim", "sigma_range", "log_sigma", "q", "source") if k not in d]
        if missing:
            raise ValueError(f"entropic schedule is missing {', '.join(missing)}")
        return cls(torch.tensor(d["log_sigma"], dtype=torch.float64), torch.tensor(d["q"], dtype=torch.float64),
                   kind=d["kind"], sigma_data=d["sigma_data"], dim=d["dim"], sigma_range=tuple(d["sigma_range"]),
                   source=d["source"])

    def save(self, path: str | Path) -> None:
        """Write the schedule as a small JSON file, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "EntropicSchedule":
        """Read a file written by `save`; anything else raises ValueError naming the file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from e


Samples = Union[Tensor, tuple[Tensor, Tensor]]
"""Samples, or (samples, integer class labels) for a class-conditional denoiser."""


@torch.no_grad()
def estimate_mmse(
    denoiser: Callable[..., Tensor],
    data: Samples | Callable[[int, torch.Generator], Samples],
    *,
    n_levels: int = 128,
    n_pairs: int = 1024,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    batch_size: int = 256,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> tuple[Tensor, Tensor]:
    """The paper's dedicated pass: per-dimension error of `denoiser` on the Karras grid (Stancevic et al. 2025).

    `data` is a tensor whose first `n_pairs` rows are the images, or a sampler `data(n, generator)`; either may
    instead be an (images, labels) pair, for a class-conditional denoiser called as `denoiser(x, sigma, labels)`
    (the MMSE given the class, as the training loss measures it). One noise draw per image (from `seed`) is
    reused at all `n_levels` levels (common random numbers), so the result does not depend on `batch_size`.
    `denoiser` gets sigma as a (B,) tensor; pass a network in eval mode. With a process group every rank must
    call this; each evaluates a strided share of the pairs and the sums are all-reduced. A stop signal
    (`evodiff_pl.utils.stop`) raises `Stopped` on every rank before the next batch. Returns (sigmas (K,)
    descending, m (K,)), float64 on the CPU, for `from_mmse`.
    """
    if n_levels < 2 or n_pairs < 1 or batch_size < 1:
        raise ValueError(f"need n_levels >= 2, n_pairs >= 1, batch_size >= 1; got {n_levels}, {n_pairs}, {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    drawn = data(n_pairs, gen) if callable(data) else data
    x0, labels = drawn if isinstance(drawn, tuple) else (drawn, None)
    x0 = x0[:n_pairs]
    if x0.shape[0] != n_pairs:
        raise ValueError(f"data has {x0.shape[0]} samples, estimate_mmse needs n_pairs={n_pairs}")
    if labels is not None and labels.shape[0] < n_pairs:
        raise ValueError(f"data has {labels.shape[0]} labels for n_pairs={n_pairs} samples")
    noise = torch.randn(x0.shape, generator=gen, dtype=x0.dtype)
    dim = x0[0].numel()
    rank, world_size = world()
    device = torch.device(device) if device is not None else x0.device
    mine = torch.arange(rank, n_pairs, world_size)
    x0, noise = x0[mine].to(device), noise[mine].to(device)
    labels = labels[:n_pairs][mine].to(device) if labels is not None else None
    sigmas = get_sigmas("karras", n_levels - 1, sigma_min, sigma_max)
    totals = torch.zeros(n_levels, dtype=torch.float64, device=device)
    for k in tqdm(range(n_levels), desc="MMSE levels", disable=not progress or rank != 0):
        for start in stoppable(range(0, x0.shape[0], batch_size), "the schedule estimation"):
            x, eps = x0[start : start + batch_size], noise[start : start + batch_size]
            sigma = torch.full((x.shape[0],), sigmas[k].item(), dtype=x.dtype, device=device)
            # x_sigma = x0 + sigma * eps  (docs/method.md §0)
            cond = () if labels is None else (labels[start : start + batch_size],)
            d = denoiser(x + sigmas[k].item() * eps, sigma, *cond)
            totals[k] += (d.to(torch.float64) - x.to(torch.float64)).square().sum()
    if world_size > 1:
        totals = all_reduce(totals, dist.ReduceOp.SUM)
    # m(sigma) = E||D(x_sigma, sigma) - x0||^2 / dim  (docs/method.md §3)
    return sigmas, totals.cpu() / (n_pairs * dim)
