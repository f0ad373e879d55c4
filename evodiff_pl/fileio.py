"""Files that are never seen half-written: write to a temporary file in the same folder, fsync, rename."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: str | Path, write: Callable[[Any], None], mode: str = "wb") -> None:
    """Write through `write(file)` into a temporary file in the same folder, fsync it, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """`atomic_write` for a text file."""
    atomic_write(path, lambda f: f.write(text), mode="w")


def atomic_write_json(path: str | Path, data: Any) -> None:
    """`atomic_write` of `data` as indented JSON with a final newline."""
    atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def atomic_copy(src: str | Path, dst: str | Path) -> None:
    """Copy a file atomically (temporary file in the destination folder, fsync, rename)."""
    with open(src, "rb") as f_src:
        atomic_write(dst, lambda f: shutil.copyfileobj(f_src, f))
