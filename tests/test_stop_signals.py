"""SIGUSR1 / SIGTERM wherever the run is (start-up, set-up and its reference statistics, a training step with its EMA
pass and schedule rebuild, the validation evaluation, a sample.py sweep or schedule estimation, the phema
reconstruction): every rank stops within seconds with exit status 128 + the signal, the checkpoint of the last whole
step, a requeue under SLURM (a fake scontrol), and the rerun redoes an abandoned evaluation or statistics. In-process
trials send the signal from inside the place (deterministic); subprocess trials from outside."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from torch import nn
from train_utils import GMM, PYTHON, ROOT, assert_equal, assert_whole_step, load, tiny_gmm, train_in_process

import evodiff_pl.training.run as run_module
from evodiff_pl.config.schema import load_config
from evodiff_pl.data.datasets import build_from_config
from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.evaluation.metrics import FrechetScore, PixelFeatures
from evodiff_pl.sampling import cli as sample_cli
from evodiff_pl.sampling import estimate as sample_estimate
from evodiff_pl.sampling import job as sample_job
from evodiff_pl.training.module import EDMModule
from evodiff_pl.training.cli import main
from evodiff_pl.training.phema import main as phema_main
from evodiff_pl.training.phema import save_snapshot
from evodiff_pl.utils.stop import STOP

STOP_LIMIT_S = 10.0
"""Every rank gone this long after the signal at most."""
EVAL = ("evaluation.enabled=true", "evaluation.feature=pixels", "evaluation.specs=[euler/logsnr/4]",
        "evaluation.grid_size=0", "trainer.val_every_steps=2", "logger.kind=csv", "logger.log_every_steps=1")


def _fake_slurm(tmp_path: Path) -> tuple[dict[str, str], Path]:
    """SLURM_JOB_ID set and a fake `scontrol` on PATH that records its arguments."""
    bin_dir, calls = tmp_path / "bin", tmp_path / "scontrol_calls"
    bin_dir.mkdir(exist_ok=True)
    (bin_dir / "scontrol").write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\n")
    (bin_dir / "scontrol").chmod(0o755)
    return {"SLURM_JOB_ID": "4242", "PATH": f"{bin_dir}:{os.environ['PATH']}"}, calls


def _scontrol_calls(calls: Path) -> list[str]:
    """The arguments the fake `scontrol` was called with (none: [])."""
    return calls.read_text().split() if calls.exists() else []


def _requeue_for(sig: int) -> list[str]:
    """The `scontrol` arguments expected after `sig`: a requeue of the fake job for SIGUSR1, nothing for SIGTERM."""
    return ["requeue", "4242"] if sig == signal.SIGUSR1 else []


@pytest.fixture
def slurm(tmp_path, monkeypatch):
    env, calls = _fake_slurm(tmp_path)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return calls


def _signal_self_at(monkeypatch, owner: object, name: str, sig: int, when) -> None:
    """Patch `owner.name` to send `sig` to this process on the first call for which `when(self)` holds."""
    original, sent = getattr(owner, name), []

    def patched(self, *args, **kwargs):
        if not sent and when(self):
            sent.append(True)
            os.kill(os.getpid(), sig)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, patched)


@pytest.mark.parametrize("place, step", [("training_step", 3), ("_ema_eval_loss", 3), ("rebuild_schedule", 2)])
def test_a_signal_in_a_training_step_stops_after_it(tmp_path, slurm, monkeypatch, place, step):
    """The signal comes in the third step (its EMA pass), or in the schedule rebuild at the end of the second."""
    _signal_self_at(monkeypatch, EDMModule, place, signal.SIGUSR1, lambda m: m.batches_seen == 2)
    assert main(["--config", str(GMM), *tiny_gmm(tmp_path)]) == 128 + signal.SIGUSR1
    ckpt = load(tmp_path / "checkpoints" / "last.ckpt")
    assert assert_whole_step(ckpt) == step and not ckpt["evodiff"].get("completed")
    assert slurm.read_text().split() == ["requeue", "4242"]
    assert not (tmp_path / "train.lock").exists() and not STOP.received


def test_a_signal_during_set_up_keeps_the_last_checkpoint(tmp_path, monkeypatch, capsys):
    train_in_process(GMM, tiny_gmm(tmp_path, "train.total_images=192"))
    last = tmp_path / "checkpoints" / "last.ckpt"
    before = last.stat().st_mtime_ns
    original = run_module.build

    def build_then_signal(cfg):
        training = original(cfg)
        os.kill(os.getpid(), signal.SIGTERM)
        return training

    monkeypatch.setattr(run_module, "build", build_then_signal)
    assert main(["--config", str(GMM), *tiny_gmm(tmp_path)]) == 128 + signal.SIGTERM
    assert last.stat().st_mtime_ns == before
    assert f"stopped by SIGTERM during set-up; checkpoint {last} (step 3)" in capsys.readouterr().err


def _val_rows(run_dir: Path) -> list[tuple[str, str]]:
    """(step, value) of every logged evaluation score."""
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [(r["step"], r["val/fd_pixels_64/euler_logsnr_nfe4"]) for r in csv.DictReader(f)
                if r.get("val/fd_pixels_64/euler_logsnr_nfe4")]


@pytest.mark.parametrize("final", [False, True], ids=["mid-training", "final"])
def test_a_signal_during_the_evaluation_stops_and_the_rerun_redoes_it(tmp_path, slurm, monkeypatch, final):
    """Evaluation of 64 samples in batches of 8; the signal comes at the third batch of the evaluation after step 2
    (or of the final one, after step 6): the checkpoint holds that step with the evaluation pending, and the
    stopped-and-resumed run logs the same scores at the same steps as the uninterrupted one."""
    overrides = tiny_gmm(tmp_path / "run", *EVAL, "evaluation.num_samples=64", "evaluation.batch_size=8",
                         f"evaluation.stats_dir={tmp_path / 'stats'}")
    train_in_process(GMM, [*overrides, f"run.dir={tmp_path / 'reference'}"])
    step = 6 if final else 2
    calls = []

    def third_batch(callback):
        calls.append(callback)
        return len(calls) == (step // 2 - 1) * 8 + 3

    _signal_self_at(monkeypatch, SampleQualityCallback, "_sample", signal.SIGUSR1, third_batch)
    assert main(["--config", str(GMM), *overrides]) == 128 + signal.SIGUSR1
    ckpt = load(tmp_path / "run" / "checkpoints" / "last.ckpt")
    assert assert_whole_step(ckpt) == step
    assert [s["pending"] for k, s in ckpt["callbacks"].items() if "SampleQuality" in k] == [1]
    assert slurm.read_text().split() == ["requeue", "4242"]
    assert main(["--config", str(GMM), *overrides]) == 0
    resumed, reference = _val_rows(tmp_path / "run"), _val_rows(tmp_path / "reference")
    steps = [step for step, _ in reference]  # trainer.validate (the final one's redo) logs at step 0
    assert [step for step, _ in resumed] == (steps[:-1] + ["0"] if final else steps), (resumed, reference)
    # Lightning logs a score as float32, the redone one goes to the logger as computed (float64)
    assert [float(v) for _, v in resumed] == pytest.approx([float(v) for _, v in reference], rel=2**-23)
    assert len(reference) == 3


def test_a_signal_during_a_sweep_stops_without_writing_the_setting(tmp_path, monkeypatch, capsys):
    train_in_process(GMM, tiny_gmm(tmp_path / "run", "train.total_images=192"))
    original, calls = sample_job.generate, []

    def generate_then_signal(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:  # the second batch of the second setting
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(sample_job, "generate", generate_then_signal)
    out = tmp_path / "out"
    args = [f"ckpt={tmp_path / 'run'}", "solver=euler", "schedule=logsnr", "nfe=2,4,6", "seeds=0-15", "batch=8",
            "format=npz", f"outdir={out}"]
    assert sample_cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM during setting euler_logsnr_nfe4" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["euler_logsnr_nfe2.npz", "scores.csv", "scores.md"]
    rows = (out / "scores.csv").read_text().splitlines()[1:]
    assert [row.split(",")[:3] for row in rows] == [["euler", "logsnr", "2"]]  # the interrupted NFE 4 has no row
    assert len(calls) == 3 and not STOP.received


def test_a_signal_during_the_reference_statistics_stops_and_the_rerun_computes_them(tmp_path, slurm, monkeypatch,
                                                                                   capsys):
    """A resumed run with a new statistics folder computes the reference statistics in set-up (1024 samples, batches
    of 250); the signal in the third batch stops it before the fourth, keeps the checkpoint and writes no statistics;
    the rerun computes them whole (the same as an uninterrupted computation's, bit for bit) and finishes."""
    train_in_process(GMM, tiny_gmm(tmp_path / "run", "train.total_images=192"))
    last, stats = tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "stats"
    before, original, calls = last.stat().st_mtime_ns, PixelFeatures.forward, []
    overrides = tiny_gmm(tmp_path / "run", *EVAL, "evaluation.num_samples=16", f"evaluation.stats_dir={stats}")

    def signal_in_the_third_batch(self, x):
        calls.append(len(x))
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(self, x)

    monkeypatch.setattr(PixelFeatures, "forward", signal_in_the_third_batch)
    assert main(["--config", str(GMM), *overrides]) == 128 + signal.SIGUSR1
    assert calls == [250] * 3 and last.stat().st_mtime_ns == before and not stats.exists()
    err = capsys.readouterr().err
    assert f"stopped by SIGUSR1 during the reference statistics; checkpoint {last} (step 3)" in err, err[-3000:]
    assert slurm.read_text().split() == ["requeue", "4242"]
    assert main(["--config", str(GMM), *overrides]) == 0
    assert assert_whole_step(load(last)) == 6
    cached, = stats.iterdir()
    cfg = load_config(GMM, overrides)
    whole = FrechetScore("pixels", num_samples=16, shape=(8,), stats_dir=tmp_path / "whole")
    whole.prepare_real(build_from_config(cfg.data, cfg.run.seed))
    assert_equal({k: load(cached)[k] for k in ("sum", "outer_sum", "count")}, whole.reference_statistics())
    assert int(load(cached)["count"]) == 1024


def test_a_signal_during_the_schedule_estimation_stops_it_before_the_next_batch(tmp_path, monkeypatch, capsys):
    train_in_process(GMM, tiny_gmm(tmp_path / "run", "train.total_images=192"))
    original, calls = sample_estimate.estimate_mmse, []

    def estimate_with_a_signal(denoiser, *args, **kwargs):
        def counted(*inputs):
            calls.append(1)
            if len(calls) == 3:  # the third of 4 batches of the first level
                os.kill(os.getpid(), signal.SIGTERM)
            return denoiser(*inputs)
        return original(counted, *args, **kwargs)

    monkeypatch.setattr(sample_estimate, "estimate_mmse", estimate_with_a_signal)
    args = [f"ckpt={tmp_path / 'run'}", "estimate_schedule=true", "levels=4", "pairs=64", "batch=16",
            f"outdir={tmp_path / 'out'}"]
    assert sample_cli.main(args) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM during the schedule estimation" in capsys.readouterr().err
    assert len(calls) == 3 and not (tmp_path / "out").exists() and not STOP.received


def test_a_signal_during_the_phema_reconstruction_stops_it_before_the_next_snapshot(tmp_path, slurm, monkeypatch,
                                                                                  capsys):
    for images in (100, 200, 300):
        for std in (0.05, 0.1):
            save_snapshot(tmp_path, images, std, nn.Linear(2, 2), {})
    original, loads = torch.load, []

    def load_with_a_signal(*args, **kwargs):
        loads.append(1)
        if len(loads) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return original(*args, **kwargs)

    monkeypatch.setattr(torch, "load", load_with_a_signal)
    out = tmp_path / "out.ckpt"
    assert phema_main([f"run.dir={tmp_path}", "std=0.07", "tol=1", f"out={out}"]) == 128 + signal.SIGUSR1
    assert "stopped by SIGUSR1 during the post-hoc EMA reconstruction" in capsys.readouterr().err
    assert len(loads) == 2 and not out.exists() and not STOP.received
    assert slurm.read_text().split() == ["requeue", "4242"]


def test_lightning_installs_no_signal_handler_of_its_own(tmp_path, monkeypatch):
    original, seen = EDMModule.training_step, []

    def recording(self, *args, **kwargs):
        seen.append((signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGUSR1)))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EDMModule, "training_step", recording)
    train_in_process(GMM, tiny_gmm(tmp_path, "train.total_images=128"))
    assert seen and all(handlers == (STOP._handle, STOP._handle) for handlers in seen)


# --- subprocesses: signals from outside, timed -------------------------------------------------------------------


def _start(args: list[str], env: dict[str, str], script: str = "train.py") -> subprocess.Popen:
    """`script args` in its own session (a signal to the group reaches every rank, as SLURM sends it)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([PYTHON, str(ROOT / script), *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def _children(pid: int) -> list[int]:
    return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _stop(proc: subprocess.Popen, sig: int, pid: int | None = None, timeout: float = 120) -> tuple[str, float]:
    """Send `sig` to `pid` (default: the whole process group); (stderr, seconds until every process of the group
    exited)."""
    sent = time.monotonic()
    if pid is None:
        os.killpg(proc.pid, sig)
    else:
        os.kill(pid, sig)
    try:
        _, err = proc.communicate(timeout=timeout)
        while True:  # the other ranks too
            try:
                os.killpg(proc.pid, 0)
            except ProcessLookupError:
                break
            assert time.monotonic() - sent < timeout
            time.sleep(0.02)
    except (subprocess.TimeoutExpired, AssertionError):
        os.killpg(proc.pid, signal.SIGKILL)
        pytest.fail(f"hung after {signal.Signals(sig).name}")
    return err, time.monotonic() - sent


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 240) -> None:
    start = time.monotonic()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() - start < timeout, f"{path} did not appear"
        time.sleep(0.05)


@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
def test_a_signal_during_the_imports_stops_at_once(tmp_path, sig):
    env, calls = _fake_slurm(tmp_path)
    proc = _start(["--config", str(GMM), *tiny_gmm(tmp_path / "run")], env)
    time.sleep(0.3)
    err, elapsed = _stop(proc, sig)
    # where 0.3 s lands depends on the machine's import speed: the imports or the set-up, both before any step
    assert proc.returncode == 128 + sig and ("during start-up" in err or "during set-up" in err), err[-3000:]
    print(f"{signal.Signals(sig).name} during the imports: exited {elapsed:.2f} s after the signal")
    assert elapsed < STOP_LIMIT_S
    assert _scontrol_calls(calls) == _requeue_for(sig)
    assert not (tmp_path / "run" / "checkpoints" / "last.ckpt").exists()


def _stop_ranks(proc: subprocess.Popen, sig: int, to: str, where: str, calls: Path) -> float:
    """Send `sig` to rank 0, rank 1 or the whole group (`to`) of a 2-rank run with fake SLURM: both ranks report the
    stop `where`, the run exits 128 + sig within STOP_LIMIT_S, requeued on SIGUSR1 only. Returns the latency."""
    rank1 = _children(proc.pid)
    assert len(rank1) == 1
    err, elapsed = _stop(proc, sig, pid={"rank0": proc.pid, "rank1": rank1[0], "group": None}[to])
    name = signal.Signals(sig).name
    assert proc.returncode == 128 + sig and err.count(f"stopped by {name} during {where}") == 2, err[-3000:]
    assert _scontrol_calls(calls) == _requeue_for(sig)
    print(f"{name} to {to} during {where}: every rank exited {elapsed:.2f} s after the signal")
    assert elapsed < STOP_LIMIT_S, elapsed
    return elapsed


DDP = ("trainer.strategy=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "data.batch_size=128")
LONG_EVAL = ("evaluation.num_samples=400000", "evaluation.batch_size=64", "checkpoint.every_steps=2")


def _two_ranks(tmp_path: Path, sig: int, to: str, during: str) -> float:
    """2 gloo ranks with fake SLURM; `sig` to rank 0, rank 1 or the group (`to`) during a long training or evaluation;
    both ranks exit 128 + sig with the checkpoint of a whole step. Returns the stop latency."""
    env, calls = _fake_slurm(tmp_path)
    run_dir = tmp_path / "run"
    extra = (*EVAL, *LONG_EVAL, f"evaluation.stats_dir={tmp_path / 'stats'}") if during == "evaluation" else ()
    proc = _start(["--config", str(GMM), *tiny_gmm(run_dir, "train.total_images=1920000",
                                                   "checkpoint.every_steps=100", *DDP, *extra)], env)
    _wait_for(run_dir / "checkpoints" / "last.ckpt", proc)
    time.sleep(1.0)  # in the evaluation after step 2 (minutes long), or in training
    elapsed = _stop_ranks(proc, sig, to, "the evaluation of" if during == "evaluation" else during, calls)
    ckpt = load(run_dir / "checkpoints" / "last.ckpt")
    step = assert_whole_step(ckpt)
    if during == "evaluation":
        assert step == 2 and [s["pending"] for k, s in ckpt["callbacks"].items() if "SampleQuality" in k] == [1]
    return elapsed


@pytest.mark.ddp
def test_sigterm_to_rank_1_alone_stops_both_ranks(tmp_path):
    _two_ranks(tmp_path, signal.SIGTERM, "rank1", "training")


@pytest.mark.ddp
def test_sigusr1_to_the_group_during_the_evaluation_stops_both_ranks(tmp_path):
    _two_ranks(tmp_path, signal.SIGUSR1, "group", "evaluation")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
@pytest.mark.parametrize("to", ["rank0", "rank1", "group"])
@pytest.mark.parametrize("during", ["training", "evaluation"])
def test_every_signal_to_any_rank_anywhere_stops_both_ranks(tmp_path, sig, to, during):
    _two_ranks(tmp_path, sig, to, during)


SLOW_EXTRACTOR = """
import os, sys, time
from pathlib import Path
from evodiff_pl.entry import train
from evodiff_pl.evaluation.metrics import PixelFeatures

forward = PixelFeatures.forward


def slow_forward(self, x):  # an Inception batch on a GPU takes about this long
    Path(os.environ["EXTRACTING"]).touch()
    time.sleep(0.2)
    return forward(self, x)


PixelFeatures.forward = slow_forward
sys.exit(train())
"""


def _stop_the_reference_statistics(tmp_path: Path, sig: int, to: str) -> float:
    """2 gloo ranks with fake SLURM compute the reference statistics at a run's first set-up (rank 0: 263 batches of
    0.2 s); `sig` to rank 0, rank 1 or the group once rank 0 extracts features. Both ranks exit 128 + sig, nothing
    is written (no checkpoint, no statistics). Returns the stop latency."""
    env, calls = _fake_slurm(tmp_path)
    script, extracting, run_dir = tmp_path / "slow_train.py", tmp_path / "extracting", tmp_path / "run"
    script.write_text(SLOW_EXTRACTOR)
    proc = _start(["--config", str(GMM), *tiny_gmm(run_dir, *DDP, *EVAL, "data.num_train=65536",
                                                   f"evaluation.stats_dir={tmp_path / 'stats'}")],
                  {**env, "EXTRACTING": str(extracting)}, script=str(script))
    _wait_for(extracting, proc)
    time.sleep(0.5)
    elapsed = _stop_ranks(proc, sig, to, "the reference statistics", calls)
    assert not (run_dir / "checkpoints").exists() and not (tmp_path / "stats").exists()
    return elapsed


@pytest.mark.ddp
def test_sigusr1_to_rank_1_alone_during_the_reference_statistics_stops_both_ranks(tmp_path):
    _stop_the_reference_statistics(tmp_path, signal.SIGUSR1, "rank1")


@pytest.mark.ddp
@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGUSR1, signal.SIGTERM])
@pytest.mark.parametrize("to", ["rank0", "rank1", "group"])
def test_every_signal_to_any_rank_during_the_reference_statistics_stops_both_ranks(tmp_path, sig, to):
    _stop_the_reference_statistics(tmp_path, sig, to)
