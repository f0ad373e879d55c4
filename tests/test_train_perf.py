"""GPU performance keys on the CPU: channels-last, torch.compile and the sync-free step train like the default path
(to float tolerance), the device-side non-finite skip keeps its guarantees, the CUDA switches are set only on request."""

from __future__ import annotations

import pytest
import torch
from train_utils import DIGITS, load, train_in_process

from evodiff_pl.training.nonfinite import NonFiniteTrainingError


def tiny_digits(run_dir, *overrides: str) -> list[str]:
    """4 steps of 16 digits on a 2-level, 16-channel U-Net; no logger, no evaluation."""
    return [f"run.dir={run_dir}", "model.net.model_channels=16", "model.net.channel_mult=[1,1]",
            "model.net.num_blocks=1", "model.net.attn_resolutions=[]", "data.batch_size=16",
            "train.total_images=64", "optim.lr_rampup_images=32", "ema.halflife_images=64",
            "entropic.update_every_steps=2", "entropic.ema_decay=0.9", "logger.kind=none", "logger.log_every_steps=2",
            "evaluation.enabled=false", "trainer.progress_bar=false", *overrides]


def weights(run_dir) -> dict[str, torch.Tensor]:
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    return {**ckpt["state_dict"], **{f"tracker.{k}": v for k, v in ckpt["evodiff"]["tracker"].items()
                                     if isinstance(v, torch.Tensor)}}


def assert_close_weights(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key].float(), b[key].float(), atol=atol, rtol=1e-4, msg=key)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("base")
    train_in_process(DIGITS, tiny_digits(run_dir))
    return weights(run_dir)


@pytest.mark.parametrize("key", ["perf.channels_last=true", "perf.sync_free_step=true"])
def test_perf_key_trains_like_the_default_step(baseline, key, tmp_path):
    train_in_process(DIGITS, tiny_digits(tmp_path, key))
    assert_close_weights(weights(tmp_path), baseline)


@pytest.mark.slow
def test_compiled_step_trains_like_the_eager_step(baseline, tmp_path):
    train_in_process(DIGITS, tiny_digits(tmp_path, "perf.compile=true"))
    assert_close_weights(weights(tmp_path), baseline)


def test_sync_free_skip_matches_the_host_skip(tmp_path):
    """A NaN batch is skipped on the device as on the host: same weights, EMA, tracker and Adam step count after the
    same 4 batches (the host run counts 3 optimizer steps, the sync-free one counts every batch as a trainer step)."""
    host, device = tmp_path / "host", tmp_path / "device"
    train_in_process(DIGITS, tiny_digits(host, "train.nan_loss_steps=[1]", "train.total_images=48"))
    with pytest.warns(UserWarning, match="1 non-finite training step"):
        train_in_process(DIGITS, tiny_digits(device, "train.nan_loss_steps=[1]", "perf.sync_free_step=true"))
    assert_close_weights(weights(device), weights(host))
    assert load(device / "checkpoints" / "last.ckpt")["optimizer_states"][0]["state"][0]["step"] == 3


def test_sync_free_streak_limit_stops_at_the_next_logging_step(tmp_path):
    with pytest.raises(NonFiniteTrainingError, match="3 consecutive"):
        train_in_process(DIGITS, tiny_digits(tmp_path, "train.nan_loss_steps=[0,1,2]", "train.max_nonfinite_steps=2",
                                             "perf.sync_free_step=true", "logger.log_every_steps=1"))


def test_sync_free_step_refuses_16_mixed(tmp_path):
    from evodiff_pl.config.schema import ConfigError

    with pytest.raises(ConfigError, match="16-mixed"):
        train_in_process(DIGITS, tiny_digits(tmp_path, "perf.sync_free_step=true", "trainer.precision=16-mixed"))


def test_cuda_switches_are_set_only_when_asked():
    from evodiff_pl.config.schema import PerfConfig
    from evodiff_pl.training.run import configure_backends

    flags = ((torch.backends.cuda.matmul, "allow_tf32"), (torch.backends.cudnn, "allow_tf32"),
             (torch.backends.cudnn, "benchmark"))
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, False)
        configure_backends(PerfConfig())
        assert not any(getattr(obj, name) for obj, name in flags)
        configure_backends(PerfConfig(tf32=True, cudnn_benchmark=True))
        assert all(getattr(obj, name) for obj, name in flags)
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)
