"""KID against its closed form, FD-DINOv2's preprocessing and plumbing with a stand-in network (no weights), the
DINOv2 weights errors, and the fid command (edm's fid.py ref/calc) on folders and zips of images."""

from __future__ import annotations

import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from evodiff_pl.evaluation import fid
from evodiff_pl.evaluation.dinov2 import IMAGENET_MEAN, IMAGENET_STD, DINOv2Features, DINOv2WeightsError
from evodiff_pl.evaluation.kid import KIDScore
from evodiff_pl.evaluation.metrics import FrechetScore, InceptionFeatures, frechet_distance, gaussian_fit
from evodiff_pl.io.nvlabs import read_mu_sigma_npz
from evodiff_pl.sampling import cli as sampling

PKL = Path(__file__).parent / "data" / "edm2" / "cond_attn.pkl"


class Source:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def stats_key(self) -> str:
        return "source"

    def real_images(self, max_n: int | None = None) -> torch.Tensor:
        return self.x[:max_n]


class StandIn(nn.Module):
    """DINOv2's interface ((N, 3, 224, 224) normalised images -> (N, embed_dim)), random weights; keeps its input."""

    embed_dim = 6

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(3 * 4, self.embed_dim)
        self.seen: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.seen = x
        return self.proj(nn.functional.adaptive_avg_pool2d(x, 2).flatten(1))


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Bińkowski et al. 2018, eq. (4), cubic polynomial kernel (x·y/d + 1)^3, in float64."""
    def k(a, b):
        return (a @ b.T / a.shape[1] + 1) ** 3
    m = len(x)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    off = lambda t: (t.sum() - t.diagonal().sum()) / (m * (m - 1))  # noqa: E731
    return float(off(kxx) + off(kyy) - 2 * kxy.mean())


def test_kid_is_the_unbiased_mmd_and_deterministic(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(120, 5, generator=g, dtype=torch.float64), torch.randn(120, 5, generator=g) * 1.3 + 0.2
    score = KIDScore("pixels", num_samples=120, shape=(5,), stats_dir=tmp_path)
    path = score.prepare_real(Source(real))
    assert path.name.endswith("-features.pt") and score.name == "kid_pixels_120"
    score.update(fake)
    value = score.compute()  # subsets of all 120 samples: every subset gives the full unbiased estimate
    assert value == pytest.approx(_mmd2_unbiased(real, fake.double()), rel=1e-10)
    assert score.compute() == value
    cached = KIDScore("pixels", num_samples=120, shape=(5,), stats_dir=tmp_path)
    cached.load_real(path)
    cached.update(fake[:60])
    cached.update(fake[60:])
    assert cached.compute() == pytest.approx(value, rel=1e-6)  # the cache holds float32 features
    with pytest.raises(ValueError, match="mu/sigma statistics are not enough"):
        cached.load_real({"sum": torch.zeros(5), "outer_sum": torch.zeros(5, 5), "count": torch.tensor(3)})


def test_dinov2_features_are_preprocessed_as_edm2() -> None:
    model = StandIn()
    features = DINOv2Features(model=model)
    grey = torch.full((2, 1, 10, 10), 77, dtype=torch.uint8)
    out = features(grey)
    assert out.dtype == torch.float64 and out.shape == (2, 6) and features.num_features == 6
    assert model.seen.shape == (2, 3, 224, 224)
    expected = (77 / 255 - torch.tensor(IMAGENET_MEAN)) / torch.tensor(IMAGENET_STD)  # a flat image stays flat
    torch.testing.assert_close(model.seen[0, :, 100, 37], expected.float(), rtol=1e-6, atol=1e-6)
    assert features(grey[:0]).shape == (0, 6)
    with pytest.raises(ValueError, match="uint8"):
        features(grey.float())


def test_fd_dinov2_goes_through_the_frechet_score(tmp_path: Path) -> None:
    g = torch.Generator().manual_seed(1)
    real, fake = (torch.randint(0, 256, (40, 3, 8, 8), generator=g, dtype=torch.uint8) for _ in range(2))
    features = DINOv2Features(model=StandIn())
    score = FrechetScore(features, num_samples=40, stats_dir=tmp_path)
    score.prepare_real(Source(real))
    score.update(fake)
    assert score.name == "fd_dinov2_40"
    with torch.no_grad():
        fits = [gaussian_fit(features(x)) for x in (real, fake)]
    assert score.compute() == pytest.approx(frechet_distance(*fits[0], *fits[1]), rel=1e-8)


def test_dinov2_without_weights_is_one_clear_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(DINOv2WeightsError, match="dinov2_weights=") as err:
        DINOv2Features(tmp_path / "missing.pth")
    assert "\n" not in str(err.value)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torch.hub, "load", offline)
    with pytest.raises(DINOv2WeightsError, match="could not load DINOv2 ViT-L/14.*URLError.*dinov2_weights=") as err:
        DINOv2Features()
    assert "\n" not in str(err.value)
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"")
    assert sampling.main([f"ckpt={PKL}", "score=fd_dinov2", f"dinov2_weights={weights}", "seeds=0-3", "nfe=4",
                          "schedule=karras", "device=cpu", f"stats={tmp_path / 'none.npz'}", "progress=false",
                          f"outdir={tmp_path / 'out'}"]) == 1
    assert capsys.readouterr().err.count("\n") == 1


def _write_images(folder: Path, n: int, seed: int, mode: str = "RGB") -> torch.Tensor:
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 3 if mode == "RGB" else 1, 8, 8), generator=g, dtype=torch.uint8)
    for i, img in enumerate(x):
        Image.fromarray(img.permute(1, 2, 0).squeeze(-1).numpy(), mode).save(folder / f"{i:03d}.png")
    return x


@pytest.mark.slow  # 7 images through InceptionV3 at 299x299: ~40 s on a shared 2-core CPU
def test_fid_ref_and_calc_on_folders_and_zips(random_inception_weights: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    real, fake = _write_images(tmp_path / "real", 4, 0), _write_images(tmp_path / "fake" / "sub", 3, 1, "L")
    with zipfile.ZipFile(tmp_path / "real.zip", "w") as z:
        for p in sorted((tmp_path / "real").iterdir()):
            z.write(p, p.name)
    common = [f"--weights={random_inception_weights}", "--batch=3", "--device=cpu"]
    assert fid.main(["ref", f"--data={tmp_path / 'real.zip'}", f"--dest={tmp_path / 'ref.npz'}", *common]) == 0
    assert fid.main(["calc", f"--images={tmp_path / 'fake'}", f"--ref={tmp_path / 'ref.npz'}", *common]) == 0
    out = capsys.readouterr().out
    net = InceptionFeatures(random_inception_weights)
    with torch.no_grad():
        fits = [gaussian_fit(net(x)) for x in (real, fake)]
    with np.load(tmp_path / "ref.npz") as f:
        assert f["mu"].dtype == np.float64 and f["sigma"].shape == (2048, 2048)
        np.testing.assert_allclose(f["mu"], fits[0][0].numpy(), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(f["sigma"], fits[0][1].numpy(), rtol=1e-9, atol=1e-12)
    assert read_mu_sigma_npz(tmp_path / "ref.npz", 2048)["count"] > 0
    value = float(out.split("fid_inception_3 = ")[1].split()[0])
    assert value == pytest.approx(frechet_distance(*fits[0], *fits[1]), rel=1e-5)


def test_fid_command_bad_input_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert fid.main(["ref", f"--data={tmp_path / 'nothing'}", f"--dest={tmp_path / 'x.npz'}",
                     f"--weights={tmp_path / 'w.pth'}"]) == 1
    assert fid.main(["calc", f"--images={tmp_path}", f"--ref={tmp_path / 'x.npz'}", "--num=1"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 2 and "does not exist" in err and "--num >= 2" in err
    assert not (tmp_path / "x.npz").exists()
