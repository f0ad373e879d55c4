"""The pieces of the training design: the global-batch data stream, the noise slices, EDM's schedules, precision."""

from __future__ import annotations

import itertools

import pytest
import torch
from train_utils import GMM, tiny_gmm, train_in_process

from evodiff_pl.data.datasets import build_datamodule
from evodiff_pl.data.stream import InfiniteSampler
from evodiff_pl.utils.seeding import derive_seed
from evodiff_pl.training.ema import ema_beta, update_ema
from evodiff_pl.training.clock import lr_at


def _take(sampler, n: int) -> list[int]:
    return list(itertools.islice(iter(sampler), n))


@pytest.mark.parametrize("world", [1, 2, 4])
def test_stream_gives_the_same_global_batches_for_any_world_size(world):
    n, batch, steps = 10, 8, 5  # batches straddle epochs
    reference = _take(InfiniteSampler(n, seed=3), batch * steps)
    local = batch // world
    shards = [_take(InfiniteSampler(n, seed=3, rank=r, world_size=world), local * steps) for r in range(world)]
    for step in range(steps):
        rebuilt = [0] * batch
        for r in range(world):
            # rank r's local sample k is global position k*W + r of the batch
            rebuilt[r::world] = shards[r][step * local:(step + 1) * local]
        assert rebuilt == reference[step * batch:(step + 1) * batch]


def test_stream_is_the_epoch_order_and_resumes_at_any_position():
    stream = _take(InfiniteSampler(10, seed=5), 30)
    epochs = []
    for e in range(3):
        epochs += torch.randperm(10, generator=torch.Generator().manual_seed(derive_seed(5, e))).tolist()
    assert stream == epochs
    assert _take(InfiniteSampler(10, seed=5, rank=1, world_size=2, start=14), 5) == stream[15::2][:5]


def test_datamodule_stream_splits_the_global_batch():
    dm = build_datamodule("gmm", dim=2, n_components=2, num_train=32, batch_size=8, seed=1)
    dm.stream_from(16)
    x, _ = next(iter(dm.train_dataloader()))
    order = _take(InfiniteSampler(32, seed=1), 24)[16:24]
    assert torch.equal(x, dm.data.tensors[0][order])


def test_edm_lr_and_ema_schedules_in_images():
    assert lr_at(0, 1e-3, 10_000_000) == 0.0
    assert lr_at(5_000_000, 1e-3, 10_000_000) == pytest.approx(5e-4)
    assert lr_at(20_000_000, 1e-3, 10_000_000) == 1e-3
    assert ema_beta(0, 512, 500_000, 0.05) == 0.0  # EDM: the first EMA copy equals the net
    # half-life min(0.5M, 0.05 * 2M) = 100k images: 0.5 ** (512 / 100k)
    assert ema_beta(2_000_000, 512, 500_000, 0.05) == pytest.approx(0.5 ** (512 / 100_000))
    assert ema_beta(100_000_000, 512, 500_000, 0.05) == pytest.approx(0.5 ** (512 / 500_000))
    assert ema_beta(0, 512, 500_000, None) == pytest.approx(0.5 ** (512 / 500_000))
    # Same decay per image whatever the batch: two steps of 256 = one step of 512 (past the ramp-up).
    assert ema_beta(10**8, 256, 500_000, 0.05) ** 2 == pytest.approx(ema_beta(10**8, 512, 500_000, 0.05))


def test_update_ema_lerps_parameters_and_copies_buffers():
    net, ema = torch.nn.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    net.weight.data.fill_(2.0)
    net.running_mean.fill_(7.0)
    update_ema(ema, net, beta=0.75)
    assert torch.allclose(ema.weight, torch.full((3,), 0.75 * 1.0 + 0.25 * 2.0))
    assert torch.equal(ema.running_mean, net.running_mean)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision_trains(tmp_path, precision):
    module = train_in_process(GMM, tiny_gmm(tmp_path, f"trainer.precision={precision}")).module
    assert module.images_seen == 384
    assert all(p.dtype == torch.float32 and torch.isfinite(p).all() for p in module.ema.parameters())
    assert module.entropic_schedule is not None
