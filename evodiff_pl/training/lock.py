"""One train.py per run directory: `<run.dir>/train.lock`, held by global rank 0 for the life of the run.

Where the filesystem supports it (local disks, NFS with its lock manager, GPFS, Lustre mounted with `-o flock`),
the lock is `fcntl.flock` on that file: an exclusive, non-blocking lock the kernel gives to one open file at a time
and drops when its process dies, however it dies, so a lock is never stale and pid reuse cannot matter. After
locking, the path must still name the locked file (a holder deletes the file before it unlocks), so two starts can
never both hold it. The holder then writes its record (host, pid, boot id, process start time, SLURM job) into the
file for other starts' error message.

Where flock fails (ENOLCK, EOPNOTSUPP, ENOSYS, EINVAL: Lustre without `-o flock`, NFS without a lock manager) the
lock is the file's existence: the record is written to a temporary file and hard-linked to train.lock, which is
atomic on NFS too and never shows a partial record. Such a lock is stale only when its process is provably gone:
the same host and boot id (/proc/sys/kernel/random/boot_id) and no process with its pid and start time (/proc/<pid>/
stat field 22: a reused pid, even this process's own after a container restart, has another start time); the same
host booted since; or an earlier run of this SLURM job (a lower SLURM_RESTART_COUNT; a requeued job may restart on
another node). A stale lock is removed only by the start that creates its takeover marker (an exclusive create) and
rereads it unchanged, so two starts never both replace it.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
import uuid
from pathlib import Path
from typing import Any

NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)
"""flock's errors on filesystems that do not support it: the exclusive-create fallback is used."""


class RunLockedError(RuntimeError):
    """Another train.py holds the run directory."""


def boot_id() -> str | None:
    """This machine's boot id (Linux), None where there is none."""
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return None


def start_time(pid: int) -> int | None:
    """The start time of process `pid` in clock ticks after boot (/proc/<pid>/stat field 22); None if it does not
    exist (or there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat[stat.rindex(")") + 2:].split()[19])  # fields after "(comm)" start at field 3


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        pass
    return True


class RunLock:
    """`<run_dir>/train.lock` (module docstring): `acquire` takes it or raises RunLockedError naming the holder,
    `release` gives it back."""

    def __init__(self, run_dir: str | Path) -> None:
        self.path = Path(run_dir) / "train.lock"
        pid = os.getpid()
        self.owner = {"host": socket.gethostname(), "pid": pid, "boot_id": boot_id(), "start_time": start_time(pid),
                      "slurm_job": os.environ.get("SLURM_JOB_ID"),
                      "slurm_restart": int(os.environ.get("SLURM_RESTART_COUNT") or 0),
                      "token": uuid.uuid4().hex, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False
        self._fd: int | None = None

    def _record(self) -> bytes:
        return json.dumps(self.owner).encode()

    def _holder(self) -> dict[str, Any] | None:
        try:
            holder = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def _refuse(self, holder: dict[str, Any] | None) -> RunLockedError:
        holder = holder or {}
        return RunLockedError(
            f"run.dir {self.path.parent} is in use by another train.py (host {holder.get('host')}, pid "
            f"{holder.get('pid')}, started {holder.get('started')}); wait for it, or use another run.dir. "
            f"If that process is gone (another node crashed), delete {self.path}")

    def acquire(self) -> None:
        """Take the lock; RunLockedError naming the holder if another process has it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f"{self.path.name}.{self.owner['token']}.tmp")
        tmp.write_bytes(self._record())
        try:
            fd = os.open(tmp, os.O_RDWR)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # does this filesystem lock files?
            except OSError as err:
                if err.errno not in NO_FLOCK:
                    raise
                return self._acquire_exclusive(tmp)
            finally:
                os.close(fd)
            self._acquire_flock()
        finally:
            tmp.unlink(missing_ok=True)

    def _acquire_flock(self) -> None:
        """flock the lock file, check the path still names it, write the record."""
        for _ in range(100):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                holder = self._holder()
                if holder is None:  # locked a moment ago, its record not written yet
                    time.sleep(0.01)
                    continue
                raise self._refuse(holder) from None
            if not self._names(fd):  # a holder deleted it before unlocking: lock the new file
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, self._record(), 0)
            self._fd, self.held = fd, True
            return
        raise self._refuse(self._holder())

    def _names(self, fd: int) -> bool:
        """Whether the lock path names the open file `fd`."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return False
        own = os.fstat(fd)
        return (st.st_dev, st.st_ino) == (own.st_dev, own.st_ino)

    def _acquire_exclusive(self, record: Path) -> None:
        """The fallback without flock: hard-link the complete `record` file to the lock path; take over a stale lock."""
        for _ in range(100):
            try:
                os.link(record, self.path)
            except FileExistsError:
                holder = self._holder()
                if holder is not None and not self.stale(holder):
                    raise self._refuse(holder) from None
                if holder is not None:
                    self._take_over(holder)
                time.sleep(0.01)
                continue
            self.held = True
            return
        raise RunLockedError(f"could not take the lock {self.path}: another process keeps replacing it")

    def _take_over(self, holder: dict[str, Any]) -> None:
        """Delete the stale lock `holder` if this process wins its takeover marker and the lock is still it."""
        marker = self.path.with_name(f"{self.path.name}.{holder.get('token', holder.get('pid'))}.takeover")
        try:
            os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
        except FileExistsError:
            return  # another start is taking it over
        try:
            if self._holder() == holder:  # only the marker's owner deletes this record: it cannot change meanwhile
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def stale(self, holder: dict[str, Any]) -> bool:
        """Whether the process that wrote the lock record `holder` is provably gone (module docstring)."""
        same_job = holder.get("slurm_job") and holder["slurm_job"] == self.owner["slurm_job"]
        if same_job and int(holder.get("slurm_restart") or 0) < self.owner["slurm_restart"]:
            return True
        if holder.get("host") != self.owner["host"]:
            return False
        if holder.get("boot_id") and self.owner["boot_id"] and holder["boot_id"] != self.owner["boot_id"]:
            return True
        try:
            pid = int(holder["pid"])
        except (KeyError, TypeError, ValueError):
            return False
        if holder.get("start_time") is not None and self.owner["start_time"] is not None:
            return start_time(pid) != holder["start_time"]
        return pid == self.owner["pid"] or not _alive(pid)  # no start time (older records): this pid is not its

    def release(self) -> None:
        """Give the lock back (delete the file, then unlock) if this process holds it."""
        if self.held and (self._fd is not None or (self._holder() or {}).get("token") == self.owner["token"]):
            self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        self.held = False
