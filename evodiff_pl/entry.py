"""The bodies of `train.py`, `sample.py` and the console scripts `evodiff-train`, `evodiff-sample`: each takes the stop
signals first (`evodiff_pl.utils.stop.launch`), then imports its command line; this module imports nothing heavy."""

from __future__ import annotations

from evodiff_pl.utils.stop import launch


def train() -> int:
    """`train.py` / `evodiff-train`: `evodiff_pl.training.cli.main`, SIGUSR1 / SIGTERM taken from process start."""
    return launch("evodiff_pl.training.cli")


def sample() -> int:
    """`sample.py` / `evodiff-sample`: `evodiff_pl.sampling.cli.main`, SIGUSR1 / SIGTERM taken from process start."""
    return launch("evodiff_pl.sampling.cli")
