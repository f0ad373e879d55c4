"""The run lock: one holder among many simultaneous starts (with flock and with its exclusive-create fallback), and a
stale-lock rule that survives pid reuse."""

from __future__ import annotations

import errno
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from evodiff_pl.training import lock as lock_module
from evodiff_pl.training.lock import RunLock, RunLockedError, boot_id, start_time

CONTENDERS, ROUNDS = 16, 12


def _no_flock(fd: int, op: int) -> None:
    raise OSError(errno.ENOLCK, "No locks available")


def _contend(root: str, no_flock: bool, barrier, wins) -> None:
    """Each round: wait for every contender, try the round's lock, hold it until all have tried, release."""
    if no_flock:
        lock_module.fcntl.flock = _no_flock
    for r in range(ROUNDS):
        lock = RunLock(Path(root) / str(r))
        barrier.wait()
        try:
            lock.acquire()
        except RunLockedError:
            pass
        else:
            with wins.get_lock():
                wins[r] += 1
        barrier.wait()
        lock.release()


def _dead_holder(run_dir: Path) -> None:
    """A lock record of a process of this host and boot that is gone (a pid of this start time does not exist)."""
    run_dir.mkdir(parents=True)
    (run_dir / "train.lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                                    "boot_id": boot_id(), "start_time": -1, "token": "gone"}))


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive_create"])
@pytest.mark.parametrize("stale", [False, True], ids=["free", "stale_lock"])
def test_one_of_many_simultaneous_starts_holds_the_lock(tmp_path, no_flock, stale):
    if stale:
        for r in range(ROUNDS):
            _dead_holder(tmp_path / str(r))
    ctx = mp.get_context("fork")
    barrier, wins = ctx.Barrier(CONTENDERS), ctx.Array("i", ROUNDS)
    procs = [ctx.Process(target=_contend, args=(str(tmp_path), no_flock, barrier, wins)) for _ in range(CONTENDERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    assert [p.exitcode for p in procs] == [0] * CONTENDERS
    assert list(wins) == [1] * ROUNDS
    assert not any(tmp_path.rglob("train.lock*"))  # released, no temporary files or takeover markers left


@pytest.mark.parametrize("no_flock", [False, True], ids=["flock", "exclusive_create"])
def test_a_held_lock_is_refused_with_its_holder_and_released(tmp_path, monkeypatch, no_flock):
    if no_flock:
        monkeypatch.setattr(lock_module.fcntl, "flock", _no_flock)
    held = RunLock(tmp_path)
    held.acquire()
    with pytest.raises(RunLockedError, match=rf"in use by another train.py \(host .*, pid {os.getpid()}, started"):
        RunLock(tmp_path).acquire()
    held.release()
    assert not (tmp_path / "train.lock").exists()
    again = RunLock(tmp_path)
    again.acquire()
    again.release()


def test_stale_rule_survives_pid_reuse():
    me = RunLock("unused")
    own = {"host": me.owner["host"], "pid": os.getpid(), "boot_id": boot_id(), "start_time": start_time(os.getpid())}
    assert not me.stale(own)  # this very process: alive
    assert me.stale({**own, "start_time": own["start_time"] - 1})  # this pid, an earlier process (container restart)
    assert me.stale({**own, "boot_id": "another-boot"})  # written before this machine rebooted
    assert not me.stale({**own, "host": "another-host", "start_time": -1})  # another node: cannot tell
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    assert me.stale({**own, "pid": dead.pid})
    assert me.stale({"host": me.owner["host"], "pid": dead.pid})  # a record of an older version
    requeued = RunLock("unused")
    requeued.owner.update(slurm_job="42", slurm_restart=1)
    assert requeued.stale({**own, "host": "another-host", "slurm_job": "42", "slurm_restart": 0})
    assert not requeued.stale({**own, "host": "another-host", "slurm_job": "42", "slurm_restart": 1})
