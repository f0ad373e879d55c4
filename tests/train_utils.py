"""Shared helpers of the tests/test_train*.py files: tiny configs and in-process or subprocess runs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
GMM = ROOT / "configs" / "gmm.yaml"
DIGITS = ROOT / "configs" / "digits.yaml"
DIGITS_EDM2 = ROOT / "configs" / "digits_edm2.yaml"
DDP = ("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu")
EVERY_STEP = ("checkpoint.every_steps=1", "checkpoint.keep_every_steps=3")
"""last.ckpt after every step and the archive step-3.ckpt: the state a run killed after step 3 leaves."""
RUN_KEYS = ("config", "digest")
"""Checkpoint entries that differ between two runs of one computation: the config (run.dir, checkpoint.*) and the
file's digest."""


def tiny_gmm(run_dir: Path, *overrides: str) -> list[str]:
    """Overrides of configs/gmm.yaml for a small, fast run (steps of 64 samples, a 2k-parameter MLP, no logger)."""
    return [
        f"run.dir={run_dir}", "data.batch_size=64", "data.num_train=1024", "data.dim=8", "data.n_components=2",
        "model.net.hidden=16", "model.net.depth=1", "model.net.emb_dim=8", "train.total_images=384",
        "optim.lr_rampup_images=128", "ema.halflife_images=256", "entropic.update_every_steps=2",
        "entropic.eval_fraction=1",  # the tracker sees every sample: enough for a schedule after a few steps
        "checkpoint.every_steps=1000", "logger.kind=none", "evaluation.enabled=false",
        "trainer.progress_bar=false", "trainer.val_every_steps=1000", *overrides,
    ]


def tiny_digits_edm2(run_dir: Path, *overrides: str) -> list[str]:
    """Overrides of configs/digits_edm2.yaml for a small, fast run: the full EDM2 U-Net (every layer an MPConv with
    forced weight normalisation, one attention block at 4x4) at 16 channels, steps of 16 digits, no logger."""
    return [
        f"run.dir={run_dir}", "data.batch_size=16", "train.total_images=96", "model.net.model_channels=16",
        "model.net.channel_mult=[1,2]", "model.net.attn_resolutions=[4]", "model.net.channels_per_head=16",
        "optim.lr_rampup_images=32", "optim.ref_images=32", "ema.snapshot_every_images=32",
        "entropic.update_every_steps=2", "checkpoint.every_steps=1000", "logger.kind=none",
        "evaluation.enabled=false", "trainer.progress_bar=false", "trainer.val_every_steps=1000", *overrides,
    ]


def train_in_process(config: Path, overrides: list[str]):
    """`run(load_config(...))` in this process (single device only: no DDP inside pytest)."""
    from evodiff_pl.config.schema import load_config
    from evodiff_pl.training.run import run

    return run(load_config(config, overrides))


def train_subprocess(config: Path, overrides: list[str], timeout: float = 300) -> subprocess.CompletedProcess:
    """`python train.py --config ... overrides` in a subprocess, from the repository root."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled"}
    return subprocess.run([PYTHON, str(ROOT / "train.py"), "--config", str(config), *overrides], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


def load(path: Path) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_equal(a, b, where: str = "") -> None:
    """a == b, tensors bit for bit, through nested dicts, lists and tuples; `where` names the first difference."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def assert_same_run(a: dict, b: dict) -> None:
    """Every piece of two checkpoints' state is equal bit for bit: weights, EMA, Adam, Lightning's loop counters, the
    tracker (every tensor), the schedule, every rank's RNG, the counters; all but the `RUN_KEYS`."""
    assert a.keys() == b.keys()
    for key in a:
        if key != "evodiff":
            assert_equal(a[key], b[key], key)
    ea, eb = a["evodiff"], b["evodiff"]
    assert ea.keys() == eb.keys()
    for key in ea.keys() - set(RUN_KEYS):
        assert_equal(ea[key], eb[key], f"evodiff.{key}")


def assert_whole_step(ckpt: dict) -> int:
    """The step a checkpoint holds, checked to be whole: every Adam state and the tracker were updated exactly
    global_step times."""
    steps = {int(s["step"]) for s in ckpt["optimizer_states"][0]["state"].values()}
    assert steps == {ckpt["global_step"]}, (steps, ckpt["global_step"])
    tracker = ckpt["evodiff"]["tracker"]
    assert tracker["steps"] + tracker["pending_steps"] == ckpt["global_step"]
    return ckpt["global_step"]


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now, for a process group's rendezvous."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
