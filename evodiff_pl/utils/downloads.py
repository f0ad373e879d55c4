"""Network downloads with a time limit, so that a node behind a firewall that drops packets fails instead of hanging;
network files given as URLs (`ckpt=https://...`), downloaded once to a cache.

torchvision's dataset download and torch.hub's weight download open URLs without a timeout; inside
`download_timeout()` every socket operation (connect, each read) gives up after `EVODIFF_DOWNLOAD_TIMEOUT`
seconds (default 60) and the caller reports what to pass on an offline node.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from evodiff_pl.utils.fileio import atomic_write

DEFAULT_TIMEOUT_S = 60.0


def timeout_seconds() -> float:
    """$EVODIFF_DOWNLOAD_TIMEOUT (seconds) if set, else 60."""
    return float(os.environ.get("EVODIFF_DOWNLOAD_TIMEOUT", DEFAULT_TIMEOUT_S))


@contextmanager
def download_timeout(seconds: float | None = None) -> Iterator[float]:
    """Sockets opened inside give up after `seconds` (default `timeout_seconds()`) without progress."""
    seconds = timeout_seconds() if seconds is None else seconds
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(seconds)
    try:
        yield seconds
    finally:
        socket.setdefaulttimeout(previous)


class DownloadError(RuntimeError):
    """A URL could not be downloaded; the message says what to pass instead (one line)."""


def is_url(path: str | Path) -> bool:
    """Whether `path` is an http(s) URL (how NVlabs publishes its networks), not a local path."""
    return isinstance(path, str) and path.startswith(("http://", "https://"))


def download_dir() -> Path:
    """$EVODIFF_DOWNLOADS if set, else ~/.cache/evodiff-pl/downloads."""
    return Path(os.environ.get("EVODIFF_DOWNLOADS", "~/.cache/evodiff-pl/downloads")).expanduser()


def cached_download(url: str) -> Path:
    """The local copy of `url` in `download_dir()`, downloaded (atomically, with `download_timeout`) the first time;
    the file keeps the URL's last part as its name (and so its suffix), in a folder named by a hash of the URL."""
    name = url.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] or "download"
    path = download_dir() / hashlib.sha256(url.encode()).hexdigest()[:16] / name
    if path.is_file():
        return path
    import http.client  # with urllib.request (and ssl), only when something is downloaded
    import urllib.request

    seconds = timeout_seconds()
    try:
        with download_timeout(seconds), urllib.request.urlopen(url) as response:
            atomic_write(path, lambda f: shutil.copyfileobj(response, f))
    except (OSError, ValueError, http.client.HTTPException) as err:
        reason = getattr(err, "reason", None) or err
        raise DownloadError(f"cannot download {url} ({type(err).__name__}: {reason}; {seconds:g} s timeout): download "
                            f"it elsewhere and pass its local path instead, or put it at {path}") from None
    return path
