"""Stop signals: SIGUSR1 (SLURM's warning before pre-emption or the time limit) and SIGTERM (scancel, the limit).

`launch` takes the signals first thing in `train.py` and `sample.py` (this module imports nothing heavy), so a signal
is kept from process start to exit: during the imports it ends the process at once; later the handler only records
it (no I/O, no collective inside a signal handler).
The ranks act on it together at safe points (every training step, every generated or reference-statistics batch):
`raise_if_stopped` all-reduces "any rank signalled" (one CPU integer over a gloo group, no device synchronisation)
and raises `Stopped` on every rank alike. Before the process group exists a process acts alone only if no other rank can
run yet (a single process, or the launcher before it starts the others); otherwise it waits for the first
collective safe point, so a signal to one rank never leaves the others waiting.
"""

from __future__ import annotations

import functools
import importlib
import os
import signal
import subprocess
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

T = TypeVar("T")


class StopSignals:
    """SIGUSR1 and SIGTERM set `received` (the first signal's number) and do nothing else."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.received = 0
        self.immediate = False
        """While the entry script imports: a signal raises `Stopped` at once if no other rank can be waiting."""
        self._previous: dict[int, Any] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received = self.received or signum
        if self.immediate and not _peers_may_run():
            self.immediate = False
            raise Stopped(signum, "start-up")

    def install(self) -> None:
        """Take SIGUSR1 and SIGTERM (from the main thread), remembering the handlers they replace the first time."""
        for sig in self.SIGNALS:
            previous = signal.signal(sig, self._handle)
            self._previous.setdefault(sig, previous)

    def uninstall(self) -> None:
        """Give the signals back to the handlers `install` found; forget any signal received."""
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()
        self.received = 0

    def is_installed(self) -> bool:
        """Whether both signals go to `received` now."""
        return all(signal.getsignal(sig) == self._handle for sig in self.SIGNALS)


STOP = StopSignals()
"""The process's stop signals (signal handlers are per process)."""


class Stopped(Exception):
    """Every rank stopped at a safe point after SIGUSR1 or SIGTERM; the process exits with 128 + the signal number.

    `step` and `path` name the checkpoint of the last whole training step written (or kept) for the rerun, if any;
    `requeued` whether the SLURM job was requeued."""

    def __init__(self, signum: int, where: str) -> None:
        super().__init__(signum, where)
        self.signum, self.where = signum, where
        self.step: int | None = None
        self.path: Path | None = None
        self.requeued = False

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    def __str__(self) -> str:
        name = signal.Signals(self.signum).name
        saved = f"; checkpoint {self.path} (step {self.step})" if self.path is not None else ""
        rerun = "; SLURM job requeued" if self.requeued else "; rerun the same command to resume"
        return f"stopped by {name} during {self.where}{saved}{rerun}"


def _peers_may_run() -> bool:
    """Whether other ranks of this job may already be running: started by torchrun (WORLD_SIZE), srun (several
    SLURM tasks) or Lightning's launcher (LOCAL_RANK in its children, and in itself once it launched them)."""
    env = os.environ
    return (int(env.get("WORLD_SIZE", "1") or 1) > 1 or "LOCAL_RANK" in env
            or int(env.get("SLURM_NTASKS", "1") or 1) > 1)


_GLOO: dict[str, Any] = {"world": None, "group": None}


def _group() -> Any:
    """A gloo group over the default group's ranks (the default group itself when it is gloo), made once per
    default group; every rank calls it at the same safe point."""
    import torch.distributed as dist

    if dist.get_backend() == "gloo":
        return None
    world = dist.group.WORLD
    if _GLOO["world"] is not world:
        _GLOO["world"], _GLOO["group"] = world, dist.new_group(backend="gloo")
    return _GLOO["group"]


def agree(*values: int) -> list[int]:
    """[the signal any rank received (0: none), max over ranks of each of `values`]: one all-reduce when a process
    group exists (call on every rank at the same point); this process's own otherwise (0 for the signal when other
    ranks may run but cannot be told yet)."""
    import torch
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        flags = torch.tensor([STOP.received, *values], dtype=torch.int64)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=_group())
        return [int(v) for v in flags.tolist()]
    return [0 if _peers_may_run() else STOP.received, *values]


def raise_if_stopped(where: str) -> None:
    """Raise `Stopped` on every rank if any rank received a stop signal (a collective: see `agree`)."""
    signum = agree()[0]
    if signum:
        raise Stopped(signum, where)


def stoppable(chunks: Sequence[T], where: str) -> Iterator[T]:
    """The `chunks` of this rank's work, with `raise_if_stopped` before each one; every rank makes as many checks as
    the rank with the most chunks (those with fewer check while the others still work), so the collectives match.
    Iterate it to the end, or leave it only through `Stopped`."""
    signum, rounds = agree(len(chunks))
    for i in range(rounds):
        if i:
            signum = agree()[0]
        if signum:
            raise Stopped(signum, where)
        if i < len(chunks):
            yield chunks[i]


def requeue() -> bool:
    """`scontrol requeue` this SLURM job (array tasks included); False outside SLURM or when it fails (a warning)."""
    job = os.environ.get("SLURM_JOB_ID")
    if os.environ.get("SLURM_ARRAY_JOB_ID") and os.environ.get("SLURM_ARRAY_TASK_ID"):
        job = f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    if not job:
        return False
    try:
        done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as err:
        print(f"warning: requeueing SLURM job {job} failed: {err}", file=sys.stderr, flush=True)
        return False
    if done.returncode:
        print(f"warning: requeueing SLURM job {job} failed ({done.returncode}): {done.stderr.strip()}",
              file=sys.stderr, flush=True)
    return done.returncode == 0


def launch(module: str) -> int:
    """The entry scripts' body: take the stop signals, import `module` (the slow part: torch, Lightning) and return
    its `main()`; a stop signal during the imports ends the process at once (no run started: nothing to save). A
    stopped run leaves without the interpreter's clean-up (its files are written and closed; under DDP the exit
    otherwise waits ~10 s in the process group's native teardown)."""
    STOP.immediate = True
    STOP.install()
    try:
        main = importlib.import_module(module).main
    except Stopped as stop:
        main = functools.partial(finish, stop, 0)  # and leave through os._exit below, as a stopped run does
    finally:
        STOP.immediate = False
    code = main()
    if code in [128 + sig for sig in StopSignals.SIGNALS]:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def finish(stop: Stopped, rank: int) -> int:
    """Requeue on SIGUSR1 under SLURM (rank 0, once), print the stop on stderr and return the exit status."""
    if rank == 0 and stop.signum == signal.SIGUSR1 and not stop.requeued:
        stop.requeued = requeue()
    print(stop, file=sys.stderr, flush=True)
    return stop.exit_code
