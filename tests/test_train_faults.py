"""Faults a cluster run meets: pre-emption signals on 1 and 2 ranks, two writers, damaged files, changed settings,
missing checkpoints, a kill during the final evaluation, unwritable or full disks, bad data and devices."""

from __future__ import annotations

import errno
import os
import random
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_utils import DIGITS, GMM, PYTHON, ROOT, assert_whole_step, load, tiny_gmm, train_in_process

from evodiff_pl.io.checkpointing import CheckpointError, read_checkpoint, write_checkpoint
from evodiff_pl.utils.fileio import atomic_write_text
from evodiff_pl.training.lock import RunLock, RunLockedError
from evodiff_pl.training.cli import main

LONG = ("train.total_images=192000", "checkpoint.every_steps=100", "model.net.dropout=0.1")
"""3000 steps of 64 samples: long enough to be interrupted at a random moment."""


def _start(run_dir: Path, *overrides: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """train.py in its own session (a signal to the group reaches every rank, as SLURM sends it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen([PYTHON, str(ROOT / "train.py"), "--config", str(GMM), *tiny_gmm(run_dir, *LONG, *overrides)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)


def _interrupt(proc: subprocess.Popen, run_dir: Path, sig: int, delay: float, timeout: float = 240) -> str:
    """Send `sig` to the run's process group `delay` s after its first checkpoint; its stderr once it exited."""
    start = time.monotonic()
    while not (run_dir / "checkpoints" / "last.ckpt").exists():  # training is under way
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, "train.py did not start"
        time.sleep(0.1)
    time.sleep(delay)
    os.killpg(proc.pid, sig)
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"train.py hung after {signal.Signals(sig).name}")
    return err


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted 1-process run of 3000 steps."""
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    train_in_process(GMM, tiny_gmm(run_dir, *LONG))
    return load(run_dir / "checkpoints" / "last.ckpt")


def test_sigterm_saves_a_whole_step_and_exits_nonzero(tmp_path):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    err = _interrupt(proc, run_dir, signal.SIGTERM, delay=0.2)
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM during training; checkpoint" in err, err[-3000:]
    assert_whole_step(load(run_dir / "checkpoints" / "last.ckpt"))
    assert not (run_dir / "train.lock").exists()


@pytest.mark.slow
def test_sigterm_at_a_random_moment_then_resume_is_exact(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _start(run_dir)
    err = _interrupt(proc, run_dir, signal.SIGTERM, delay=random.uniform(1.0, 3.0))
    assert proc.returncode == 128 + signal.SIGTERM and "stopped by SIGTERM during training; checkpoint" in err, err[-3000:]
    saved = load(run_dir / "checkpoints" / "last.ckpt")
    assert 100 <= saved["global_step"] < 3000, "the signal came too late to test anything"
    assert_whole_step(saved)
    assert not (run_dir / "train.lock").exists()
    assert main(["--config", str(GMM), *tiny_gmm(run_dir, *LONG)]) == 0
    resumed = load(run_dir / "checkpoints" / "last.ckpt")
    for key, value in reference["state_dict"].items():
        assert torch.equal(value, resumed["state_dict"][key]), key
    for i, state in reference["optimizer_states"][0]["state"].items():
        assert torch.equal(state["exp_avg"], resumed["optimizer_states"][0]["state"][i]["exp_avg"]), i
    assert resumed["evodiff"]["rng"][0]["torch"].equal(reference["evodiff"]["rng"][0]["torch"])


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """SLURM_JOB_ID set (not SLURM_NTASKS: Lightning still launches the ranks) and a fake scontrol that records."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir()
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def _preempt_two_ranks(tmp_path: Path, delay: float) -> None:
    env, calls = _fake_slurm(tmp_path)
    run_dir = tmp_path / "run"
    proc = _start(run_dir, "trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu",
                  "data.batch_size=128", env=env)
    err = _interrupt(proc, run_dir, signal.SIGUSR1, delay=delay)
    assert proc.returncode == 128 + signal.SIGUSR1, err[-3000:]
    saved = load(run_dir / "checkpoints" / "last.ckpt")
    assert_whole_step(saved)
    assert len(saved["evodiff"]["rng"]) == 2
    assert calls.read_text().split() == ["requeue", "4242"]
    assert "SLURM job requeued" in err


@pytest.mark.ddp
@pytest.mark.slow  # the default run has tests/test_stop_signals.py's 2-rank trials (SIGTERM to rank 1, SIGUSR1 to all)
def test_sigusr1_on_two_ranks_saves_requeues_and_exits(tmp_path):
    _preempt_two_ranks(tmp_path, delay=2.0)


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("trial", range(6))
def test_sigusr1_on_two_ranks_at_random_moments(tmp_path, trial):
    _preempt_two_ranks(tmp_path, delay=random.Random(trial).uniform(0.0, 6.0))


def test_a_second_writer_is_refused_and_a_stale_lock_taken_over(tmp_path):
    lock = RunLock(tmp_path)
    lock.acquire()
    with pytest.raises(RunLockedError, match=rf"in use by another train.py \(host .*, pid {os.getpid()}"):
        train_in_process(GMM, tiny_gmm(tmp_path))
    assert not (tmp_path / "checkpoints").exists()
    lock.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    atomic_write_text(tmp_path / "train.lock", f'{{"host": "{lock.owner["host"]}", "pid": {dead.pid}}}')
    train_in_process(GMM, tiny_gmm(tmp_path))  # a crashed owner on this host: stale
    assert not (tmp_path / "train.lock").exists()


def test_archives_are_kept_and_a_missing_last_ckpt_is_not_a_fresh_start(tmp_path):
    run_dir = tmp_path / "run"
    train_in_process(GMM, tiny_gmm(run_dir, "checkpoint.keep_every_steps=3", "checkpoint.every_steps=3"))
    ckpts = run_dir / "checkpoints"
    step3 = (ckpts / "step-3.ckpt").read_bytes()
    (ckpts / "last.ckpt").rename(tmp_path / "moved-away.ckpt")
    with pytest.raises(CheckpointError, match=rf"no last.ckpt .* run.resume={ckpts / 'step-6.ckpt'}"):
        train_in_process(GMM, tiny_gmm(run_dir, "checkpoint.keep_every_steps=3"))
    (ckpts / "step-6.ckpt").unlink()  # as if the copy at step 6 had been interrupted
    result = train_in_process(GMM, tiny_gmm(run_dir, "checkpoint.keep_every_steps=3", "checkpoint.every_steps=3",
                                            f"run.resume={ckpts / 'step-3.ckpt'}"))
    assert result.ckpt_path == ckpts / "step-3.ckpt"
    assert (ckpts / "step-3.ckpt").read_bytes() == step3 and (ckpts / "step-6.ckpt").is_file()


def test_an_interrupted_archive_copy_is_made_on_resume(tmp_path):
    overrides = ("checkpoint.keep_every_steps=3", "checkpoint.every_steps=3")
    train_in_process(GMM, tiny_gmm(tmp_path, *overrides, "train.total_images=192"))
    (tmp_path / "checkpoints" / "step-3.ckpt").unlink()
    train_in_process(GMM, tiny_gmm(tmp_path, *overrides))
    assert load(tmp_path / "checkpoints" / "step-3.ckpt")["global_step"] == 3


def _overwrite_tensor_bytes(path: Path, n: int = 8) -> None:
    """Overwrite n bytes in the middle of the largest tensor record of a torch zip checkpoint."""
    with zipfile.ZipFile(path) as zf:
        info = max((i for i in zf.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    with open(path, "r+b") as f:
        f.seek(info.header_offset + 26)
        name_len, extra_len = (int.from_bytes(f.read(2), "little") for _ in range(2))
        f.seek(info.header_offset + 30 + name_len + extra_len + info.file_size // 2)
        f.write(b"\x7f" * n)


def test_damaged_checkpoint_is_refused(tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "train.total_images=192"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    _overwrite_tensor_bytes(last)
    torch.load(last, weights_only=True)  # still a loadable file: only the digest can tell
    with pytest.raises(CheckpointError, match=rf"checkpoint {last} is damaged: .*run.resume=PATH"):
        train_in_process(GMM, tiny_gmm(tmp_path))
    with pytest.raises(CheckpointError, match="damaged"):
        read_checkpoint(last)


def test_settings_that_change_the_run_are_refused_and_allowed_changes_recorded(tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "train.total_images=192"))
    for bad, name in (("run.seed=1", r"run\.seed: checkpoint 0, config 1"), ("loss.P_mean=-1.0", r"loss\.P_mean"),
                      ("optim.betas=[0.9,0.99]", r"optim\.betas"), ("entropic.kind=entropic", r"entropic\.kind")):
        with pytest.raises(CheckpointError, match=name):
            train_in_process(GMM, tiny_gmm(tmp_path, bad))
    train_in_process(GMM, tiny_gmm(tmp_path, "optim.lr=0.001", "checkpoint.every_steps=3"))
    history = load(tmp_path / "checkpoints" / "last.ckpt")["evodiff"]["config_history"]
    changes = {"optim.lr": [0.002, 0.001], "train.total_images": [192, 384]}
    assert history == [{"global_step": 3, "images_seen": 192, "changes": changes}]


def test_a_kill_during_the_final_evaluation_is_finished_by_the_rerun(tmp_path):
    overrides = tiny_gmm(tmp_path, "evaluation.enabled=true", "evaluation.num_samples=16", "evaluation.feature=pixels",
                         "evaluation.specs=[euler/logsnr/4]", f"evaluation.stats_dir={tmp_path / 'stats'}",
                         "logger.kind=csv")
    train_in_process(GMM, overrides)
    last = tmp_path / "checkpoints" / "last.ckpt"
    ckpt = read_checkpoint(last)
    assert ckpt["evodiff"]["completed"] is True
    ckpt = torch.load(last, weights_only=True)
    ckpt["evodiff"]["completed"] = False  # as written before the final evaluation, which a kill then stopped
    write_checkpoint(last, ckpt)
    shutil.rmtree(tmp_path / "plots")
    rows_before = (tmp_path / "csv" / "metrics.csv").read_text().count("val/fd_pixels_16")
    train_in_process(GMM, overrides)
    assert (tmp_path / "plots" / "schedule.png").is_file() and read_checkpoint(last)["evodiff"]["completed"] is True
    assert "val/fd_pixels_16/euler_logsnr_nfe4" in (tmp_path / "csv" / "metrics.csv").read_text()
    assert rows_before >= 1
    before = last.stat().st_mtime_ns
    train_in_process(GMM, overrides)  # complete: nothing to do
    assert last.stat().st_mtime_ns == before


def test_csv_log_is_one_file_across_resumes(tmp_path):
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=csv", "logger.log_every_steps=1", "train.total_images=192"))
    train_in_process(GMM, tiny_gmm(tmp_path, "logger.kind=csv", "logger.log_every_steps=1"))
    assert [p.name for p in (tmp_path / "csv").iterdir()] == ["metrics.csv"]
    steps = [row.split(",")[0] for row in (tmp_path / "csv" / "metrics.csv").read_text().splitlines()[1:]]
    assert len(steps) >= 6


def test_stale_temporary_files_are_removed_and_files_get_the_umask(tmp_path):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    stale = ckpts / ".last.ckpt.k2j4h.tmp"
    stale.write_bytes(b"partial")
    old = os.umask(0o022)
    try:
        train_in_process(GMM, tiny_gmm(tmp_path))
    finally:
        os.umask(old)
    assert not stale.exists()
    assert (ckpts / "last.ckpt").stat().st_mode & 0o777 == 0o644
    assert (tmp_path / "config.yaml").stat().st_mode & 0o777 == 0o644


def test_precision_records_what_runs(tmp_path):
    with pytest.warns(UserWarning, match="trainer.precision=16-mixed runs as bf16-mixed"):
        train_in_process(GMM, tiny_gmm(tmp_path, "trainer.precision=16-mixed", "train.total_images=64"))
    assert "precision: bf16-mixed" in (tmp_path / "config.yaml").read_text()
    assert load(tmp_path / "checkpoints" / "last.ckpt")["evodiff"]["config"]["trainer"]["precision"] == "bf16-mixed"
    with pytest.warns(UserWarning, match="runs as bf16-mixed"):  # resumed with the same command: nothing changed
        train_in_process(GMM, tiny_gmm(tmp_path, "trainer.precision=16-mixed", "train.total_images=128"))
    state = load(tmp_path / "checkpoints" / "last.ckpt")["evodiff"]
    assert state["images_seen"] == 128 and state["config_history"] == [
        {"global_step": 1, "images_seen": 64, "changes": {"train.total_images": [64, 128]}}]


@pytest.mark.parametrize("accelerator", ["gpu", "tpu"])
def test_missing_accelerator_is_one_line(tmp_path, capsys, accelerator):
    if accelerator == "gpu" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["--config", str(GMM), *tiny_gmm(tmp_path, f"trainer.accelerator={accelerator}")]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: trainer (accelerator={accelerator}") and err.count("\n") == 1


def test_dataset_smaller_than_the_batch_is_one_line(tmp_path, capsys):
    assert main(["--config", str(GMM), *tiny_gmm(tmp_path, "data.num_train=32")]) == 1
    err = capsys.readouterr().err
    assert err == "error: gmm: 32 training samples < batch_size=64; no full batch can be drawn\n"


def test_corrupt_image_is_named_in_one_line(tmp_path, capsys):
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (8, 8), 40 * i).save(folder / f"{i}.png")
    (folder / "2.png").write_bytes((folder / "2.png").read_bytes()[:20])  # truncated
    overrides = [f"run.dir={tmp_path / 'run'}", "data.name=image_folder", f"data.root={folder}", "data.resolution=8",
                 "data.channels=1", "data.batch_size=2", "train.total_images=64", "logger.kind=none",
                 "evaluation.enabled=false", "trainer.progress_bar=false", "model.net.model_channels=8",
                 "model.net.channel_mult=[1]"]
    assert main(["--config", str(DIGITS), *overrides]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot read image {folder / '2.png'}") and err.count("\n") == 1


def test_full_disk_is_one_line_naming_the_file(tmp_path, capsys, monkeypatch):
    def full(obj, f, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr("evodiff_pl.io.checkpointing.torch.save", full)
    assert main(["--config", str(GMM), *tiny_gmm(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: no space left on device writing {tmp_path / 'checkpoints' / 'last.ckpt'}")
    assert not list((tmp_path / "checkpoints").glob(".*.tmp"))
