"""Kernel Inception Distance: `KIDScore`, the `FrechetScore` interface around torchmetrics' KernelInceptionDistance.

KID (Bińkowski et al. 2018) is the unbiased MMD² between the features of generated and reference samples with the
cubic polynomial kernel k(x, y) = (xᵀy/d + 1)³, averaged over `subsets` random subsets of `subset_size` samples
(at most the number of samples of either side); the subsets are drawn from a fixed seed, so the value is
deterministic. KID keeps every feature vector (not running sums): the reference features are cached as a float32
tensor, the generated ones are gathered from every rank at `compute()`.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.kid import KernelInceptionDistance

from evodiff_pl.evaluation.metrics import FrechetScore, count_label
from evodiff_pl.utils.dist import all_reduce, world


class KIDScore(FrechetScore):
    """KID of generated samples to reference data; used as `FrechetScore` (prepare_real/load_real, reset, update,
    compute on every rank). `load_real` takes a file of `prepare_real` (its reference features)."""

    subsets: int = 100
    subset_size: int = 1000
    seed: int = 0

    def _make_metric(self, extractor: nn.Module) -> Metric:
        with warnings.catch_warnings():  # "will save all extracted features": that is what KID is
            warnings.filterwarnings("ignore", "Metric `Kernel Inception Distance` will save")
            return KernelInceptionDistance(feature=extractor, subsets=self.subsets,
                                           subset_size=self.subset_size,
                                           reset_real_features=False, normalize=False)

    @property
    def name(self) -> str:
        """E.g. kid_inception_50k."""
        return f"kid_{self.feature_name}_{count_label(self.num_samples)}"

    def cache_path(self, stats_key: str) -> Path:
        path = super().cache_path(stats_key)
        return path.with_name(f"{path.stem}-features.pt")

    def _features_state(self) -> dict[str, Tensor]:
        return {"features": torch.cat(self.metric.real_features).detach().to("cpu", torch.float32)}

    def _set_real(self, stats: dict[str, Tensor] | None) -> None:
        d = self.metric.inception.num_features
        features = torch.zeros(0, d) if stats is None else stats.get("features")
        if features is None or features.ndim != 2 or features.shape[1] != d:
            what = sorted(stats) if features is None else tuple(features.shape)
            raise ValueError(f"reference for KID holds {what}, not the (N, {d}) features KID needs (a file of "
                             "KIDScore.prepare_real; mu/sigma statistics are not enough)")
        self.metric.real_features = [features.to(self.device, torch.float64)]

    def _value(self) -> float:
        local = [sum(len(f) for f in self.metric.real_features), sum(len(f) for f in self.metric.fake_features)]
        counts = torch.tensor(local, device=self.device)
        n = int((all_reduce(counts) if world()[1] > 1 else counts).min())
        if n < 2:
            raise ValueError(f"KID needs >= 2 reference and generated samples, got {n}")
        self.metric.subset_size = min(self.subset_size, n)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return float(self.metric.compute()[0])
