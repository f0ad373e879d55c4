"""Resumable sweeps: each setting's identity (`setting_key`), the settings already scored in an output folder
(`scored_rows`), and progress that suits a terminal (tqdm) or a log file (a plain line per setting, at most one
a minute within it).

A setting is the same when the checkpoint's weights (its stored digest, else a digest of the loaded weights and
the EMA choice), the seeds, the score with its reference statistics, the solver with its options and the sigma
grid are; `scores.csv` records that key per row, so rerunning a sweep skips what it measured before.
"""

from __future__ import annotations

import csv
import sys
import time
from pathlib import Path
from typing import Any

from torch import Tensor
from tqdm import tqdm

from evodiff_pl.io.checkpointing import LoadedCheckpoint, content_digest

KEY = "key"
"""The column of scores.csv holding `setting_key`."""
PLAIN_EVERY_S = 60.0


def weights_key(loaded: LoadedCheckpoint, ema: bool) -> str:
    """The checkpoint's stored digest (whole file) with the EMA choice, else a digest of the loaded weights."""
    stored = loaded.meta.get("digest")
    return f"{stored}-ema{int(ema)}" if stored else content_digest(loaded.denoiser.state_dict())


def setting_key(weights: str, seeds: Tensor, score: str, reference: dict[str, Tensor] | None, name: str,
                options: dict[str, Any], sigmas: Tensor | None) -> str:
    """A digest of everything one row of the table depends on."""
    return content_digest({"weights": weights, "seeds": seeds, "score": score, "reference": reference,
                           "setting": name, "options": options, "sigmas": sigmas})


def scored_rows(path: Path) -> dict[str, dict[str, str]]:
    """The rows of an existing scores.csv with a score, by key ({} if there is none or it is unreadable)."""
    try:
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
    except (OSError, csv.Error, UnicodeDecodeError):
        return {}
    return {r[KEY]: r for r in rows if r.get(KEY) and r.get("seconds") not in (None, "", "-")}


class Progress:
    """Images done for one setting: a tqdm bar on a terminal; otherwise plain lines, at most one a minute and one
    at the end (`close`)."""

    def __init__(self, total: int, name: str, enabled: bool, terminal: bool | None = None) -> None:
        self.total, self.name, self.enabled = total, name, enabled
        self.terminal = sys.stderr.isatty() if terminal is None else terminal
        self.bar = tqdm(total=total, unit="img", desc=name) if enabled and self.terminal else None
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and (now := time.perf_counter()) - self.last >= PLAIN_EVERY_S:
            self._line(now)

    def _line(self, now: float) -> None:
        self.last = now
        rate = self.done / max(self.last - self.start, 1e-9)
        print(f"{self.name}: {self.done}/{self.total} img, {rate:.1f} img/s", file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        elif self.enabled:
            self._line(time.perf_counter())
