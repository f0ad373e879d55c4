"""Fréchet distances between generated samples and reference data, correct under DDP.

`FrechetScore` wraps torchmetrics' `FrechetInceptionDistance` (float64 running sums of features and
outer products on every rank, summed once at `compute()`) with a feature extractor chosen by name:

- "inception": the standard FID features (torch-fidelity's InceptionV3 port of the TF graph, 2048-d pool
  features, TF-style bilinear resize without antialiasing as in EDM's numbers); grey images are repeated
  to RGB. Offline clusters pass `weights_path` (torch-fidelity's `weights-inception-2015-12-05-6726825d.pth`,
  `INCEPTION_FILE`).
- "dinov2": FD-DINOv2's 1024-d DINOv2 ViT-L/14 features (`evodiff_pl.evaluation.dinov2`; local weights via
  `weights_path`).
- "pixels": the flattened uint8 pixel values (as float64) of images, or the raw vectors of vector data
  (gmm); a cheap, offline distance for tiny images. It is called FD, never FID.

Any nn.Module with an int `num_features` and a forward returning (N, d) works as a custom extractor; it
receives the samples unconverted (uint8 images or float vectors) and may set `feature_name`.

Reference statistics are cached per (dataset stats_key, extractor, number of real samples). Under
DDP they live on rank 0 only (zeros elsewhere) since compute() sums every rank's state; every rank
must call `compute()`. Keep the score out of the LightningModule: its state_dict holds the extractor.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import os
import re
from pathlib import Path
from collections.abc import Iterable
from typing import Callable, NamedTuple, Protocol

import torch
from torch import Tensor, nn
from torchmetrics import Metric
from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
from torchmetrics.utilities.exceptions import TorchMetricsUserError

from evodiff_pl.evaluation.dinov2 import DINOv2Features
from evodiff_pl.utils.dist import all_reduce, all_reduce_sum_sync, world
from evodiff_pl.utils.downloads import download_timeout
from evodiff_pl.utils.fileio import atomic_write
from evodiff_pl.utils.images import to_uint8
from evodiff_pl.utils.stop import stoppable

INCEPTION_URL = (
    "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/weights-inception-2015-12-05-6726825d.pth"
)
INCEPTION_FILE = INCEPTION_URL.rsplit("/", 1)[1]
"""The one name of the Inception weights file everywhere (torch-fidelity's release asset)."""


class InceptionWeightsError(FileNotFoundError, RuntimeError):
    """The Inception weights are missing or unreadable; the message says which file to pass."""


_OFFLINE_HINT = (f"on an offline node download {INCEPTION_URL} elsewhere and pass its path (train.py: "
                 f"evaluation.weights_path=/path/{INCEPTION_FILE}, sample.py: inception_weights=...), "
                 "or use evaluation.feature=pixels")


def default_stats_dir() -> Path:
    """$EVODIFF_STATS if set, else ~/.cache/evodiff-pl/stats."""
    return Path(os.environ.get("EVODIFF_STATS", "~/.cache/evodiff-pl/stats")).expanduser()


def gaussian_fit(x: Tensor) -> tuple[Tensor, Tensor]:
    """Mean (d,) and unbiased covariance (d, d) of samples (N, d), in float64: the Gaussian a Fréchet distance compares."""
    x = x.to(torch.float64)
    return x.mean(0), torch.cov(x.T)


def frechet_distance(mu1: Tensor, cov1: Tensor, mu2: Tensor, cov2: Tensor) -> float:
    """Fréchet distance between N(mu1, cov1) and N(mu2, cov2), in float64.

    tr sqrt(cov1 cov2) is the sum of the square roots of the eigenvalues of cov1 @ cov2 (as torchmetrics
    computes it); they are real and >= 0 for PSD inputs, so round-off imaginary parts are dropped and
    tiny negative values clamped to 0.
    """
    mu1, cov1, mu2, cov2 = (torch.as_tensor(t, dtype=torch.float64) for t in (mu1, cov1, mu2, cov2))
    eig = torch.linalg.eigvals(cov1 @ cov2).real.clamp(min=0)
    # Dowson & Landau (1982); Heusel et al. (2017) eq. (6): |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2))
    return float((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * eig.sqrt().sum())


class DataMoments(NamedTuple):
    """Gaussian moments (float64, CPU) of the data's features, and the feature map `features(samples)` -> (B, D)
    that gives a sample its features as the score does (`FrechetScore.moments`; the tuner's fd_data objective)."""

    mean: Tensor
    cov: Tensor
    features: Callable[[Tensor], Tensor]


def count_label(n: int) -> str:
    """Sample count in a metric name: multiples of 1000 as "10k", anything else in full ("1797", "2500")."""
    return f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n)


def score_name(feature_name: str, num_samples: int) -> str:
    """E.g. fid_inception_10k, fd_pixels_2k: FID only for Inception features, FD for any other feature."""
    return f"{'fid' if feature_name == 'inception' else 'fd'}_{feature_name}_{count_label(num_samples)}"


class PixelFeatures(nn.Module):
    """Samples flattened to float64 vectors: pixel values 0..255 of uint8 images, raw values of vectors."""

    feature_name = "pixels"

    def __init__(self, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.shape = tuple(shape)
        self.num_features = math.prod(self.shape)

    def forward(self, x: Tensor) -> Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"expected samples of shape {self.shape}, got {tuple(x.shape[1:])}")
        return x.reshape(x.shape[0], self.num_features).to(torch.float64)


class InceptionFeatures(nn.Module):
    """The 2048-d pool features of FID's InceptionV3 for uint8 (N, 1 or 3, H, W) images, as float64.

    Resizes to 299 with the TF1-compatible bilinear interpolation (no antialiasing: EDM/TF numbers).
    """

    feature_name = "inception"
    num_features = 2048

    def __init__(self, weights_path: str | os.PathLike | None = None) -> None:
        """
        Args:
            weights_path: torch-fidelity's InceptionV3 state dict file; None downloads it once into
                $TORCH_HOME/hub/checkpoints (fails offline). Errors are raised here, not at the first use.
        """
        super().__init__()
        if weights_path is not None and not Path(weights_path).expanduser().is_file():
            raise InceptionWeightsError(f"Inception weights file {weights_path} does not exist; {_OFFLINE_HINT}")
        path = None if weights_path is None else str(Path(weights_path).expanduser())
        try:
            with download_timeout() as seconds:
                self.net = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                              feature_extractor_weights_path=path, antialias=False)
        except Exception as err:  # download (URLError, timeout), unpickling and state-dict errors all mean the same
            where = f"from {path}" if path else f"from {INCEPTION_URL} (no weights_path given, {seconds:g} s timeout)"
            first = str(err).splitlines()[0] if str(err) else ""
            raise InceptionWeightsError(
                f"could not load the Inception weights {where}: {type(err).__name__}: {first}; {_OFFLINE_HINT}"
            ) from err

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) == 0:
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=x.device)
        return self.net(x.expand(-1, 3, -1, -1)).to(torch.float64)


def build_extractor(
    feature: str, shape: tuple[int, ...] | None = None, weights_path: str | os.PathLike | None = None
) -> nn.Module:
    """The extractor named `feature` ("pixels" needs the sample shape, "inception" and "dinov2" take weights_path)."""
    if feature == "pixels":
        if shape is None:
            raise ValueError("feature='pixels' needs the sample shape")
        return PixelFeatures(shape)
    if feature == "inception":
        return InceptionFeatures(weights_path)
    if feature == "dinov2":
        return DINOv2Features(weights_path)
    raise ValueError(f"unknown feature {feature!r}; valid: pixels, inception, dinov2 (or pass an nn.Module)")


def _fingerprint(extractor: nn.Module) -> str:
    """Short hash of an extractor's class, width and state (so that different weights never share a cache)."""
    h = hashlib.sha1(f"{type(extractor).__qualname__}:{extractor.num_features}".encode())
    for key, value in extractor.state_dict().items():
        h.update(f"{key}:{tuple(value.shape)}:{value.dtype}".encode())
        h.update(value.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:10]


class RealData(Protocol):
    """What the reference statistics are computed from (the datamodules of `evodiff_pl.data.stream`)."""

    def stats_key(self) -> str: ...

    def real_images(self, max_n: int | None = None) -> Tensor: ...


class FrechetScore:
    """Fréchet distance of generated samples to reference data, float64 sums on every rank, reduced once.

    Use: `prepare_real(datamodule, rank=...)` once, then per evaluation `reset()`, `update(samples)` on
    every rank with its share, `compute()` on every rank.
    """

    def __init__(
        self,
        feature: str | nn.Module = "pixels",
        *,
        num_samples: int,
        shape: tuple[int, ...] | None = None,
        weights_path: str | os.PathLike | None = None,
        stats_dir: str | os.PathLike | None = None,
        num_real: int | None = None,
        batch_size: int = 250,
    ) -> None:
        """
        Args:
            feature: "pixels", "inception" or an extractor module (see the module docstring).
            num_samples: generated samples per evaluation; only names the score (`name`).
            shape: shape of one sample; needed by "pixels".
            weights_path: local InceptionV3 weights for "inception" (see `InceptionFeatures`).
            stats_dir: cache of reference statistics; default `default_stats_dir()`.
            num_real: reference samples used (the first num_real of `real_images`); None = all of them.
            batch_size: reference samples per extractor call when computing the reference statistics.
        """
        extractor = feature if isinstance(feature, nn.Module) else build_extractor(feature, shape, weights_path)
        if not isinstance(getattr(extractor, "num_features", None), int):
            raise TypeError("a custom feature extractor needs an int attribute num_features")
        if num_samples < 2 or (num_real is not None and num_real < 2):
            raise ValueError(f"need num_samples >= 2 and num_real >= 2 (or None), got {num_samples}, {num_real}")
        self.feature_name = getattr(extractor, "feature_name", type(extractor).__name__.lower())
        self.num_samples = num_samples
        self.num_real = num_real
        self.batch_size = batch_size
        self.stats_dir = Path(stats_dir).expanduser() if stats_dir is not None else default_stats_dir()
        self.metric = self._make_metric(extractor)

    def _make_metric(self, extractor: nn.Module) -> Metric:
        return FrechetInceptionDistance(
            feature=extractor, reset_real_features=False, normalize=False, dist_sync_fn=all_reduce_sum_sync
        )

    @property
    def name(self) -> str:
        """The logged name, e.g. fd_pixels_2k or fid_inception_50k."""
        return score_name(self.feature_name, self.num_samples)

    @property
    def device(self) -> torch.device:
        return self.metric.device

    def to(self, device: torch.device | str) -> "FrechetScore":
        self.metric.to(device)
        return self

    def cache_path(self, stats_key: str) -> Path:
        """<stats_dir>/<stats_key>-<feature>-<extractor hash>-n<num_real or all>.pt."""
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", stats_key)
        n = "all" if self.num_real is None else str(self.num_real)
        return self.stats_dir / f"{safe}-{self.feature_name}-{_fingerprint(self.metric.inception)}-n{n}.pt"

    def reference_statistics(self) -> dict[str, Tensor]:
        """The loaded reference statistics (sum, outer_sum, count) on the CPU: rank 0's; zeros on other ranks."""
        return self._features_state()

    def _features_state(self) -> dict[str, Tensor]:
        m = self.metric
        return {
            "sum": m.real_features_sum.detach().cpu(),
            "outer_sum": m.real_features_cov_sum.detach().cpu(),
            "count": m.real_features_num_samples.detach().cpu(),
        }

    def moments(self) -> DataMoments:
        """The reference statistics as Gaussian moments on every rank (under a process group every rank calls it:
        rank 0's statistics are summed with the others' zeros), with this score's feature map."""
        stats = self._features_state()
        packed = torch.cat([stats["sum"].double(), stats["outer_sum"].double().flatten(),
                            stats["count"].double().reshape(1)]).to(self.device)
        packed = (all_reduce(packed) if world()[1] > 1 else packed).cpu()
        d, n = stats["sum"].numel(), packed[-1].item()
        if n < 2:
            raise ValueError("no reference statistics loaded (prepare_real or load_real first)")
        mean = packed[:d] / n
        cov = (packed[d:-1].reshape(d, d) - n * torch.outer(mean, mean)) / (n - 1)  # unbiased, as gaussian_fit
        return DataMoments(mean, cov, self.features)

    @torch.no_grad()
    def features(self, samples: Tensor) -> Tensor:
        """Features (B, D) of generated samples, float64 on the CPU, quantised and extracted as `update` does."""
        x = to_uint8(samples) if samples.ndim == 4 and samples.is_floating_point() else samples
        return self.metric.inception(x.to(self.device)).double().cpu()

    def _set_real(self, stats: dict[str, Tensor] | None) -> None:
        m, d, dev = self.metric, self.metric.inception.num_features, self.device
        if stats is None:
            stats = {"sum": torch.zeros(d), "outer_sum": torch.zeros(d, d), "count": torch.tensor(0)}
        elif stats["sum"].shape != (d,) or stats["outer_sum"].shape != (d, d):
            raise ValueError(f"cached statistics have {tuple(stats['sum'].shape)} features, the extractor {d}")
        m.real_features_sum = stats["sum"].to(dev, torch.float64)
        m.real_features_cov_sum = stats["outer_sum"].to(dev, torch.float64)
        m.real_features_num_samples = stats["count"].to(dev, torch.int64)

    def real_statistics(self, batches: Iterable[Tensor]) -> dict[str, Tensor]:
        """Make the reference statistics those of `batches` of real samples (uint8 images or vectors) and return
        them (sum, outer_sum, count; KID: features)."""
        self._set_real(None)
        for batch in batches:
            self.metric.update(batch.to(self.device), real=True)
        return self._features_state()

    def prepare_real(self, data: RealData, *, rank: int = 0) -> Path:
        """Load (or compute and cache) the reference statistics into the metric on rank 0; zeros elsewhere.

        Under DDP every rank calls it together: rank 0 alone computes missing statistics (the same on 1 or N
        processes) and every rank joins a stop check before each of its batches (`evodiff_pl.utils.stop.stoppable`),
        so a stop signal to any rank raises `Stopped` on all of them within one extractor call, before the cache
        is written. Rank 0 writes the cache atomically (`evodiff_pl.utils.fileio`). Returns the cache path.
        """
        path = self.cache_path(data.stats_key())
        compute = rank == 0 and not path.is_file()
        real = data.real_images(max_n=self.num_real).split(self.batch_size) if compute else ()
        batches = stoppable(real, "the reference statistics")
        if not compute:
            for _ in batches:  # the other ranks check with rank 0 before each of its batches
                pass
            self.load_real(path, rank=rank)
            return path
        stats = self.real_statistics(batches)
        atomic_write(path, lambda f: torch.save({**stats, "stats_key": data.stats_key(), "feature": self.feature_name}, f))
        return path

    def load_real(self, path: str | os.PathLike | dict[str, Tensor], *, rank: int = 0) -> None:
        """Load reference statistics (a file written by `prepare_real`, or its dict of sum, outer_sum, count) into
        the metric on rank 0; zeros elsewhere."""
        if rank != 0:
            self._set_real(None)
        else:
            self._set_real(path if isinstance(path, dict) else torch.load(path, map_location="cpu", weights_only=True))

    def reset(self) -> None:
        """Forget the generated samples (the reference statistics stay)."""
        self.metric.reset()

    def update(self, samples: Tensor) -> None:
        """Add generated samples: images (N, C, H, W) in [-1, 1] are quantised with `to_uint8`, vectors stay float.

        An empty batch is allowed (a rank without samples still has to call `compute()`).
        """
        x = to_uint8(samples) if samples.ndim == 4 and samples.is_floating_point() else samples
        self.metric.update(x.to(self.device), real=False)

    def compute(self) -> float:
        """The distance over every rank's samples; call it on every rank (it synchronises)."""
        try:
            return self._value()
        except BaseException:
            # A failing compute leaves torchmetrics' state synced (summed over ranks): restore the local state.
            with contextlib.suppress(TorchMetricsUserError):  # raised when it was not synced
                self.metric.unsync()
            raise

    def _value(self) -> float:
        return float(self.metric.compute())
