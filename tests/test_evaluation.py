import logging
import os
from types import SimpleNamespace

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import WandbLogger
from PIL import Image
from torch import nn

from evodiff_pl.data.datasets import DigitsDataModule, GMMDataModule
from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.sampling.generate import EvalSpec
from evodiff_pl.evaluation.metrics import FrechetScore
from evodiff_pl.schedules.grids import get_sigmas
from evodiff_pl.toy import GaussianMixture
from evodiff_pl.training.datamodule import as_lightning


class MixtureDenoiser(nn.Module):
    """The exact denoiser of a mixture, for samples of any shape, optionally biased: D*(x, sigma) + bias."""

    def __init__(self, mixture: GaussianMixture, bias: float = 0.0, fail: str | None = None) -> None:
        super().__init__()
        self.mixture, self.bias, self.fail = mixture, bias, fail

    def forward(self, x, sigma, labels=None):
        if self.fail == "raise":
            raise RuntimeError("broken denoiser")
        d = self.mixture.denoise(x, sigma) + self.bias
        return d * float("nan") if self.fail == "nan" else d


class FakeModule(L.LightningModule):
    """The attributes the callback reads from the training module, around an exact mixture denoiser."""

    def __init__(self, mixture, sample_shape, bias=0.0, schedule=None, fail=None):
        super().__init__()
        self.ema = MixtureDenoiser(mixture, bias, fail)
        self.entropic_schedule = schedule
        self.sample_shape = tuple(sample_shape)
        self.num_classes = 0
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.images_seen = 12345
        self.unused = nn.Parameter(torch.zeros(()))

    def validation_step(self, batch, batch_idx):
        return None


class LogSNRSchedule:
    """Stands in for a learned EntropicSchedule of kind rescaled_entropic."""

    kind = "rescaled_entropic"

    def sigmas(self, n_steps, sigma_min, sigma_max):
        return get_sigmas("logsnr", n_steps, sigma_min, sigma_max)


class RecordingCallback(SampleQualityCallback):
    """Saves every generated batch (with its indices) to `record_dir`, one file per call and process."""

    def __init__(self, *args, record_dir, **kwargs):
        super().__init__(*args, **kwargs)
        self.record_dir = record_dir

    def _sample(self, pl_module, spec, sigmas, indices):
        x = super()._sample(pl_module, spec, sigmas, indices)
        torch.save((indices, x.cpu()), os.path.join(self.record_dir, f"{spec.name}-{os.getpid()}-{int(indices[0])}.pt"))
        return x


def _trainer(tmp_path, callback, **kwargs):
    options = dict(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                   enable_model_summary=False, default_root_dir=tmp_path)
    return L.Trainer(callbacks=[callback], **{**options, **kwargs})


def _gmm(dim=16, num_train=4096):
    return GMMDataModule(dim=dim, n_components=8, num_train=num_train, batch_size=64)


def test_construction_errors_are_immediate(tmp_path):
    for specs, match in [(["heun/karras/35"], "34 or 36"), (["rk4/karras/10"], "unknown solver"),
                         (["euler/cosine/10"], "unknown schedule"), ([], "empty"),
                         (["heun/karras/36", "heun/karras/36"], "duplicate")]:
        with pytest.raises(ValueError, match=match):
            SampleQualityCallback(specs)
    with pytest.raises(ValueError, match="not both"):
        SampleQualityCallback(["euler/karras/10"], every_n_evals=2, every_n_images=1000)
    with pytest.raises(FileNotFoundError, match="weights_path"):
        SampleQualityCallback(["euler/karras/10"], feature="inception", weights_path=tmp_path / "missing.pth")
    with pytest.raises(ValueError, match="unknown feature"):
        SampleQualityCallback(["euler/karras/10"], feature="clip")


def test_schedule_of_evaluations_and_resume():
    module = SimpleNamespace(images_seen=0)
    cb = SampleQualityCallback(["euler/karras/10"], every_n_evals=3)
    assert [cb._due(module) for _ in range(7)] == [False, False, True, False, False, True, False]
    cb = SampleQualityCallback(["euler/karras/10"], every_n_images=1000)
    due = []
    for seen in (0, 400, 999, 1000, 1500, 2300, 2900, 3000):
        module.images_seen = seen
        due.append(cb._due(module))
    assert due == [False, False, False, True, False, True, False, True]
    resumed = SampleQualityCallback(["euler/karras/10"], every_n_images=1000)
    resumed.load_state_dict(cb.state_dict())
    module.images_seen = 3500
    assert not resumed._due(module)
    other = SampleQualityCallback(["euler/karras/10"], num_samples=500, every_n_images=1000)
    assert other.state_key != cb.state_key


def test_perfect_model_is_at_the_floor_and_a_biased_one_is_not(tmp_path):
    dm = _gmm()
    scores = {}
    for bias in (0.0, 0.3):
        cb = SampleQualityCallback(["dpmpp_2m/logsnr/20"], num_samples=1000, stats_dir=tmp_path, batch_size=500)
        out = _trainer(tmp_path, cb).validate(FakeModule(dm.mixture, dm.shape, bias=bias), datamodule=as_lightning(dm),
                                              verbose=False)
        scores[bias] = out[0]["val/fd_pixels_1k/dpmpp_2m_logsnr_nfe20"]
    floor = FrechetScore("pixels", num_samples=1000, shape=dm.shape, stats_dir=tmp_path)
    floor.prepare_real(dm)
    floors = []
    for k in range(5):  # fresh exact samples against the same reference statistics
        floor.reset()
        floor.update(dm.mixture.sample(1000, torch.Generator().manual_seed(100 + k)).float())
        floors.append(floor.compute())
    assert 0.003 < np.mean(floors) < 0.03
    assert scores[0.0] < 2.5 * np.mean(floors)
    assert scores[0.3] > 100 * np.mean(floors)


def _digits_module(dm, **kwargs):
    means = dm.real_images(20).reshape(20, -1).double() / 127.5 - 1
    mixture = GaussianMixture(torch.ones(20), means, torch.full((20,), 0.01))
    return FakeModule(mixture, dm.shape, **kwargs)


def test_images_names_grids_and_skipped_schedules(tmp_path, caplog):
    dm = DigitsDataModule(batch_size=64)
    specs = ["heun/karras/16", "evodiff/rescaled_entropic/8"]
    cb = SampleQualityCallback(specs, num_samples=200, stats_dir=tmp_path / "stats", grid_size=9, out_dir=tmp_path)
    with caplog.at_level(logging.INFO):
        out = _trainer(tmp_path, cb).validate(_digits_module(dm), datamodule=as_lightning(dm), verbose=False)[0]
    assert list(out) == ["val/fd_pixels_200/heun_karras_nfe16"]
    assert 0 < out["val/fd_pixels_200/heun_karras_nfe16"] < 64 * 255**2
    assert "skipping evodiff_rescaled_entropic_nfe8: no learned schedule yet" in caplog.text
    grid = np.array(Image.open(tmp_path / "grids" / "heun_karras_nfe16_12345.png"))
    assert grid.shape == (3 * 34 + 2, 3 * 34 + 2, 3)  # 8 px digits drawn at 4x, torchvision padding 2
    assert (tmp_path / "stats").is_dir() and len(os.listdir(tmp_path / "stats")) == 1

    cb = SampleQualityCallback(specs, num_samples=200, stats_dir=tmp_path / "stats", grid_size=0)
    out = _trainer(tmp_path, cb).validate(_digits_module(dm, schedule=LogSNRSchedule()), datamodule=as_lightning(dm),
                                          verbose=False)
    assert sorted(out[0]) == ["val/fd_pixels_200/evodiff_rescaled_entropic_nfe8", "val/fd_pixels_200/heun_karras_nfe16"]


@pytest.mark.parametrize("fail", ["nan", "raise"])
def test_failures_never_stop_training(tmp_path, fail, caplog):
    dm = _gmm(dim=4, num_train=256)
    cb = SampleQualityCallback(["euler/logsnr/4"], num_samples=16, stats_dir=tmp_path)
    module = FakeModule(dm.mixture, dm.shape, fail=fail)
    with caplog.at_level(logging.WARNING), pytest.warns(UserWarning, match="skipping euler_logsnr_nfe4: sample gen"):
        out = _trainer(tmp_path, cb).validate(module, datamodule=as_lightning(dm), verbose=False)
    assert out == [{}]
    assert ("non-finite samples" if fail == "nan" else "broken denoiser") in caplog.text


def test_grid_goes_to_wandb(tmp_path):
    class RecordingWandb(WandbLogger):
        def __init__(self):  # no wandb run: only log_image is used
            self.calls = []

        def log_image(self, key, images, step=None, **kwargs):
            self.calls.append((key, images, step, kwargs))

    dm = DigitsDataModule(batch_size=64)
    module = _digits_module(dm)
    cb = SampleQualityCallback(["euler/karras/4"], grid_size=4, out_dir=tmp_path)
    logger = RecordingWandb()
    trainer = SimpleNamespace(default_root_dir="unused", loggers=[logger], global_step=7)
    spec = EvalSpec.parse("euler/karras/4")
    cb._save_grid(trainer, module, spec, spec.sigmas(0.002, 80.0))
    path = tmp_path / "grids" / "euler_karras_nfe4_12345.png"
    assert path.is_file()
    assert logger.calls == [("samples/euler_karras_nfe4", [str(path)], 7, {"caption": ["12345 images"]})]


@pytest.mark.ddp
def test_one_and_two_processes_agree(tmp_path):
    dm = _gmm(dim=8, num_train=1024)
    specs = ["dpmpp_2m/logsnr/8", "evodiff/rescaled_entropic/6"]
    results, samples = [], []
    for devices, strategy in ((1, "auto"), (2, "ddp_spawn")):
        record = tmp_path / f"samples{devices}"
        record.mkdir()
        stats = tmp_path / f"stats{devices}"  # reference statistics computed (on rank 0) in both runs
        cb = RecordingCallback(specs, num_samples=101, stats_dir=stats, batch_size=16, record_dir=str(record))
        module = FakeModule(dm.mixture, dm.shape, schedule=LogSNRSchedule())
        trainer = _trainer(tmp_path, cb, devices=devices, strategy=strategy)
        results.append(trainer.validate(module, datamodule=as_lightning(dm), verbose=False)[0])
        by_index = {}
        for f in sorted(os.listdir(record)):
            indices, x = torch.load(record / f)
            for j, row in zip(indices.tolist(), x):
                by_index[(f.split("-")[0], j)] = row
        samples.append(by_index)
        assert len(os.listdir(stats)) == 1
        if devices == 2:
            assert len({f.split("-")[1] for f in os.listdir(record)}) == 2  # both processes generated
    assert sorted(results[0]) == sorted(results[1]) and len(results[0]) == 2
    for key in results[0]:
        assert results[1][key] == pytest.approx(results[0][key], rel=1e-6, abs=1e-9)
    assert samples[0].keys() == samples[1].keys() and len(samples[0]) == 2 * 101
    for key, row in samples[0].items():
        assert torch.equal(samples[1][key], row)
