import os
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch

from evodiff_pl.utils.images import to_uint8
from evodiff_pl.evaluation.metrics import (
    INCEPTION_URL,
    FrechetScore,
    InceptionFeatures,
    PixelFeatures,
    count_label,
    frechet_distance,
    gaussian_fit,
    score_name,
)


class RealSource:
    """The datamodule interface `prepare_real` uses: stats_key() and real_images(max_n)."""

    def __init__(self, data, key="fake-data"):
        self.data, self.key, self.calls = data, key, 0

    def stats_key(self):
        return self.key

    def real_images(self, max_n=None):
        self.calls += 1
        return self.data[:max_n]


class CountingPixels(PixelFeatures):
    feature_name = "pixels"

    def __init__(self, shape):
        super().__init__(shape)
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return super().forward(x)


def _floats_for(images_uint8):
    """Float images in [-1, 1] that `to_uint8` maps exactly onto the given uint8 images."""
    return (images_uint8.double() + 0.25 - 128) / 127.5


def _images(n, shape=(1, 4, 4), high=200, seed=0):
    return torch.randint(0, high, (n, *shape), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def test_frechet_distance_diagonal_closed_form():
    g = torch.Generator().manual_seed(0)
    d = 12
    mu1, mu2 = torch.randn(d, generator=g, dtype=torch.float64), torch.randn(d, generator=g, dtype=torch.float64)
    a, b = torch.rand(d, generator=g, dtype=torch.float64) + 0.1, torch.rand(d, generator=g, dtype=torch.float64) * 3
    exact = float((mu1 - mu2).square().sum() + (a.sqrt() - b.sqrt()).square().sum())
    assert frechet_distance(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(exact, rel=1e-10, abs=1e-10)
    # the same covariances in a common rotated basis (commuting, non-diagonal): same distance
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    fd = frechet_distance(mu1, q @ torch.diag(a) @ q.T, mu2, q @ torch.diag(b) @ q.T)
    assert fd == pytest.approx(exact, rel=1e-10, abs=1e-10)
    assert frechet_distance(mu1, torch.diag(a), mu1, torch.diag(a)) == pytest.approx(0.0, abs=1e-12)


def test_frechet_distance_matches_scipy_sqrtm():
    rng = np.random.default_rng(1)
    d = 20
    x, y = rng.normal(size=(d, 40)), rng.normal(size=(d, 5)) * 2  # the second is rank-deficient
    c1, c2 = x @ x.T / 40, y @ y.T / 5
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    exact = ((mu1 - mu2) ** 2).sum() + np.trace(c1 + c2 - 2 * scipy.linalg.sqrtm(c1 @ c2).real)
    assert frechet_distance(mu1, c1, mu2, c2) == pytest.approx(exact, rel=1e-8)


def test_names():
    counts = (10000, 2000, 50000, 1797, 2500, 500)
    assert [count_label(n) for n in counts] == ["10k", "2k", "50k", "1797", "2500", "500"]
    assert score_name("inception", 10000) == "fid_inception_10k"
    assert score_name("pixels", 2000) == "fd_pixels_2k"
    assert FrechetScore("pixels", num_samples=1797, shape=(3,)).name == "fd_pixels_1797"


def test_pixel_score_closed_forms(tmp_path):
    real = _images(300)
    d = real[0].numel()
    score = FrechetScore("pixels", num_samples=300, shape=real.shape[1:], stats_dir=tmp_path)
    score.prepare_real(RealSource(real))
    fake = _floats_for(real)
    assert torch.equal(to_uint8(fake), real)
    for chunk in fake.split(64):
        score.update(chunk)
    assert score.compute() == pytest.approx(0.0, abs=1e-7)
    score.reset()
    shift = 10
    score.update(_floats_for(real + shift))
    # identical covariances: FD = |shift|^2 per pixel, summed over d pixels
    assert score.compute() == pytest.approx(shift**2 * d, rel=1e-9)


def test_moments_are_the_gaussian_of_the_reference_features_and_features_are_the_scores(tmp_path):
    """What the tuner's fd_data objective compares with: the reference statistics as (mean, unbiased covariance),
    and the features the score gives generated images (quantised to uint8 first)."""
    real = _images(300)
    score = FrechetScore("pixels", num_samples=300, shape=real.shape[1:], stats_dir=tmp_path)
    score.prepare_real(RealSource(real))
    moments = score.moments()
    mean, cov = gaussian_fit(real.reshape(300, -1).double())
    assert torch.allclose(moments.mean, mean, rtol=1e-12) and torch.allclose(moments.cov, cov, rtol=1e-9, atol=1e-9)
    fake = _floats_for(real)
    assert torch.equal(moments.features(fake), real.reshape(300, -1).double())
    score.update(fake)
    assert frechet_distance(*gaussian_fit(moments.features(fake)), moments.mean, moments.cov) == pytest.approx(
        score.compute(), abs=1e-6)
    with pytest.raises(ValueError, match="no reference statistics"):
        FrechetScore("pixels", num_samples=2, shape=(3,), stats_dir=tmp_path).moments()


def test_vector_score_is_on_raw_floats(tmp_path):
    g = torch.Generator().manual_seed(3)
    scale = torch.tensor([1.0, 2, 0.5, 1, 3], dtype=torch.float64)
    real = torch.randn(500, 5, generator=g, dtype=torch.float64) * scale
    shift = torch.tensor([0.3, -0.1, 0.0, 0.2, 0.05], dtype=torch.float64)
    score = FrechetScore("pixels", num_samples=500, shape=(5,), stats_dir=tmp_path)
    score.prepare_real(RealSource(real.float()))
    score.update(real.float() + shift.float())
    assert score.compute() == pytest.approx(float(shift.float().double().square().sum()), rel=1e-5)


def test_reference_statistics_are_cached_and_reused(tmp_path):
    real = _images(250, shape=(2, 3, 3))
    fake = _floats_for(_images(120, shape=(2, 3, 3), seed=9))
    source = RealSource(real)

    def run(stats_dir, num_real=200):
        extractor = CountingPixels(real.shape[1:])
        score = FrechetScore(extractor, num_samples=120, stats_dir=stats_dir, num_real=num_real, batch_size=64)
        path = score.prepare_real(source)
        real_calls = extractor.calls
        score.update(fake)
        return score.compute(), path, real_calls

    value, path, calls = run(tmp_path)
    assert calls == 4 and path.is_file() and path.parent == tmp_path  # 200 references in batches of 64
    assert "fake-data-pixels-" in path.name and path.name.endswith("-n200.pt")
    mtime = path.stat().st_mtime_ns
    cached, path2, calls2 = run(tmp_path)
    assert calls2 == 0 and path2 == path and path.stat().st_mtime_ns == mtime and source.calls == 1
    assert cached == value
    recomputed, _, calls3 = run(tmp_path / "other")
    assert calls3 == 4 and recomputed == value
    assert sorted(os.listdir(tmp_path)) == [path.name, "other"]  # no temporary file left behind
    stats = torch.load(path, weights_only=True)
    assert stats["sum"].dtype == stats["outer_sum"].dtype == torch.float64 and int(stats["count"]) == 200
    assert torch.allclose(stats["sum"], real[:200].reshape(200, -1).double().sum(0))
    # another number of reference samples is another cache entry
    assert run(tmp_path, num_real=None)[1].name.endswith("-nall.pt")


def test_reference_statistics_live_on_rank_zero_only(tmp_path):
    real = _images(50)
    score = FrechetScore("pixels", num_samples=50, shape=real.shape[1:], stats_dir=tmp_path)
    path = score.prepare_real(RealSource(real), rank=1)
    assert not path.exists()
    assert int(score.metric.real_features_num_samples) == 0 and not score.metric.real_features_sum.any()


# ---- Inception (offline: a generated state dict with the right keys) ----


def test_inception_path_runs_offline_and_matches_torch_fidelity(random_inception_weights, tmp_path):
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    real, fake = _images(2, shape=(1, 8, 8), high=256, seed=1), _images(2, shape=(1, 8, 8), high=256, seed=2)
    score = FrechetScore("inception", num_samples=2, weights_path=random_inception_weights, stats_dir=tmp_path)
    assert score.name == "fid_inception_2"
    score.prepare_real(RealSource(real))
    score.update(_floats_for(fake))
    value = score.compute()
    # independent pipeline: torch-fidelity's own extractor (TF-style resize, no antialias) + frechet_distance
    reference = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], str(random_inception_weights)).eval()
    with torch.no_grad():
        feats = [reference(x.expand(-1, 3, -1, -1))[0].double() for x in (real, fake)]
    ours = score.metric.inception(real)
    assert ours.dtype == torch.float64 and ours.shape == (2, 2048)
    torch.testing.assert_close(ours, feats[0], rtol=1e-5, atol=1e-6)
    stats = [(f.mean(0), torch.cov(f.T)) for f in feats]
    assert value > 0
    assert value == pytest.approx(frechet_distance(*stats[0], *stats[1]), rel=1e-4)
    assert score.metric.inception(real[:0]).shape == (0, 2048)


def test_inception_weights_errors_are_clear_and_immediate(tmp_path):
    with pytest.raises(FileNotFoundError, match="weights_path"):
        InceptionFeatures(tmp_path / "missing.pth")
    bad = tmp_path / "bad.pth"
    bad.write_text("not a state dict")
    with pytest.raises(RuntimeError, match="pass its path"):
        InceptionFeatures(bad)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        FrechetScore("inception", num_samples=10, weights_path=tmp_path / "missing.pth")


def _hub_inception() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]


@pytest.mark.skipif(not _hub_inception().is_file(), reason="real Inception weights not present (offline machine)")
def test_real_inception_weights_match_torch_fidelity_fid(tmp_path):
    import torch_fidelity

    class Images(torch.utils.data.Dataset):
        def __init__(self, x):
            self.x = x

        def __len__(self):
            return len(self.x)

        def __getitem__(self, i):
            return self.x[i].expand(3, -1, -1)

    real, fake = _images(12, (1, 8, 8), 256, seed=1), _images(12, (1, 8, 8), 256, seed=2)
    score = FrechetScore("inception", num_samples=12, stats_dir=tmp_path)
    score.prepare_real(RealSource(real))
    score.update(_floats_for(fake))
    expected = torch_fidelity.calculate_metrics(input1=Images(fake), input2=Images(real), fid=True, cuda=False,
                                                verbose=False)["frechet_inception_distance"]
    assert score.compute() == pytest.approx(expected, rel=1e-3)
