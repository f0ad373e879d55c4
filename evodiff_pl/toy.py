"""The analytic testbed: an isotropic Gaussian mixture with an exact denoiser, MMSE and ODE (docs/method.md §4)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


class GaussianMixture(nn.Module):
    """Mixture of N(mu_k, v_k I) with weights pi_k; every quantity of the VE process is exact.

    Computations run in float64; `denoise` returns the dtype of its input, so the module is a
    drop-in "perfect model" `denoiser(x, sigma)` for the solvers.
    """

    def __init__(self, weights: Tensor, means: Tensor, variances: Tensor) -> None:
        super().__init__()
        weights, means, variances = (torch.as_tensor(t, dtype=torch.float64) for t in (weights, means, variances))
        if means.ndim != 2 or weights.shape != (means.shape[0],) or variances.shape != weights.shape:
            raise ValueError("expected weights (K,), means (K, dim), variances (K,)")
        if (weights < 0).any() or (variances <= 0).any():
            raise ValueError("weights must be >= 0 and variances > 0")
        self.register_buffer("weights", weights / weights.sum())
        self.register_buffer("means", means)
        self.register_buffer("variances", variances)

    @classmethod
    def default(cls, dim: int = 64, n_components: int = 8, seed: int = 0) -> "GaussianMixture":
        """The benchmark mixture: means ~ N(0, 0.5^2 I), variances in [0.005, 0.025], Dirichlet weights."""
        g = torch.Generator().manual_seed(seed)
        means = 0.5 * torch.randn(n_components, dim, generator=g, dtype=torch.float64)
        variances = 0.005 + 0.02 * torch.rand(n_components, generator=g, dtype=torch.float64)
        weights = -torch.log(torch.rand(n_components, generator=g, dtype=torch.float64))  # Dirichlet(1)
        return cls(weights, means, variances)

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    @property
    def n_components(self) -> int:
        return self.means.shape[0]

    def _sigma2(self, sigma: Tensor | float, batch: int) -> Tensor:
        s = torch.as_tensor(sigma, dtype=torch.float64, device=self.means.device).reshape(-1)
        return s.expand(batch).square()[:, None]  # (B, 1)

    def _joint(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """log pi_k N(x; mu_k, (v_k + sigma^2) I) (B, K), x - mu_k (B, K, dim), v_k + sigma^2 (B, K), sigma^2."""
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        s2 = self._sigma2(sigma, x.shape[0])
        tot = self.variances[None, :] + s2
        diff = x[:, None, :] - self.means[None]
        # marginal of x_sigma given component k: N(mu_k, (v_k + sigma^2) I)  (docs/method.md §4)
        logp = torch.log(self.weights)[None] - 0.5 * (
            diff.square().sum(-1) / tot + self.dim * torch.log(2 * math.pi * tot)
        )
        return logp, diff, tot, s2

    def log_prob(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact log density of x_sigma = x_0 + sigma eps, per sample (B,)."""
        return torch.logsumexp(self._joint(x, sigma)[0], dim=1)

    def _posterior(self, x: Tensor, sigma: Tensor | float) -> tuple[Tensor, Tensor, Tensor]:
        """Responsibilities r (B, K), component posterior means a (B, K, dim) and sigma^2 (B, 1)."""
        logp, diff, tot, s2 = self._joint(x, sigma)
        r = torch.softmax(logp, dim=1)
        a = self.means[None] + (self.variances[None] / tot)[..., None] * diff  # E[x0 | x_sigma, k]
        return r, a, s2

    def denoise(self, x: Tensor, sigma: Tensor | float) -> Tensor:
        """Exact D*(x, sigma) = sum_k r_k (mu_k + v_k/(v_k+sigma^2)(x - mu_k))  (docs/method.md §4)."""
        r, a, _ = self._posterior(x, sigma)
        return torch.einsum("bk,bkd->bd", r, a).reshape(x.shape).to(x.dtype)

    forward = denoise

    def sample(self, n: int, generator: torch.Generator | None = None, return_labels: bool = False):
        """n exact samples of the data distribution, float64 (n, dim) (and their component ids)."""
        dev = self.means.device
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        eps = torch.randn(n, self.dim, generator=generator, dtype=torch.float64, device=dev)
        x = self.means[k] + self.variances[k].sqrt()[:, None] * eps
        return (x, k) if return_labels else x

    def mmse(self, sigmas: Tensor, n_mc: int = 4096, generator: torch.Generator | None = None) -> Tensor:
        """Per-dimension MMSE m(sigma) = E tr Cov(x0 | x_sigma) / dim, Rao-Blackwellised Monte Carlo.

        The same data and noise draws are used at every sigma (common random numbers).
        """
        sigmas = torch.as_tensor(sigmas, dtype=torch.float64, device=self.means.device).reshape(-1)
        x0 = self.sample(n_mc, generator=generator)
        eps = torch.randn(x0.shape, generator=generator, dtype=torch.float64, device=x0.device)
        out = torch.empty_like(sigmas)
        for i, s in enumerate(sigmas.tolist()):
            r, a, s2 = self._posterior(x0 + s * eps, s)
            d = torch.einsum("bk,bkd->bd", r, a)
            # tr Cov = sum_k r_k (dim s^2 v_k/(v_k+s^2) + ||a_k - D||^2)  (docs/method.md §4, centred form)
            within = self.dim * s2 * self.variances[None] / (self.variances[None] + s2)
            between = (a - d[:, None]).square().sum(-1)
            out[i] = (r * (within + between)).sum(1).mean() / self.dim
        return out

    def ode_solve(self, x_T: Tensor, sigma_max: float, sigma_min: float, n_steps: int = 2000) -> Tensor:
        """Exact probability-flow ODE endpoint: classical RK4 on dx/dln(sigma) = x - D*(x, sigma).

        The default step count reproduces the reference endpoints to ~1e-10 (see tests/test_toy.py).
        """
        x = x_T.to(torch.float64).reshape(x_T.shape[0], -1)
        ts = torch.linspace(math.log(sigma_max), math.log(sigma_min), n_steps + 1, dtype=torch.float64).tolist()

        def f(y: Tensor, t: float) -> Tensor:
            return y - self.denoise(y, math.exp(t))

        for t0, t1 in zip(ts[:-1], ts[1:]):
            h = t1 - t0
            k1 = f(x, t0)
            k2 = f(x + 0.5 * h * k1, t0 + 0.5 * h)
            k3 = f(x + 0.5 * h * k2, t0 + 0.5 * h)
            k4 = f(x + h * k3, t1)
            x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        return x.reshape(x_T.shape).to(x_T.dtype)
