"""Network downloads with a time limit, so that a node behind a firewall that drops packets fails instead of hanging.

torchvision's dataset download and torch.hub's weight download open URLs without a timeout; inside
`download_timeout()` every socket operation (connect, each read) gives up after `EVODIFF_DOWNLOAD_TIMEOUT`
seconds (default 60) and the caller reports what to pass on an offline node.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator
from contextlib import contextmanager

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
