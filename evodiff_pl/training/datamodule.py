"""The Trainer's view of a `DiffusionDataModule`: a LightningDataModule that delegates to it.

The datamodules themselves (`evodiff_pl.data`) do not import Lightning, so sample.py starts without it; training
and validation pass `as_lightning(datamodule)` to the Trainer. Every other attribute (shape, stats_key(),
real_images(), ...) reads through to the wrapped datamodule, so callbacks see `trainer.datamodule` as before.
"""

from __future__ import annotations

from typing import Any

import lightning as L
from torch.utils.data import DataLoader

from evodiff_pl.data.stream import DiffusionDataModule


class LightningData(L.LightningDataModule):
    """Lightning hooks forwarded to `source`; the Trainer is handed to it before each loader is built."""

    def __init__(self, source: DiffusionDataModule) -> None:
        super().__init__()
        self.source = source
        self.prepare_data_per_node = source.prepare_data_per_node

    def __getattr__(self, name: str) -> Any:
        if name == "source":  # not set yet (unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.source, name)

    def prepare_data(self) -> None:
        self.source.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        self.source.setup(stage)

    def train_dataloader(self) -> DataLoader:
        self.source.trainer = self.trainer
        return self.source.train_dataloader()

    def val_dataloader(self) -> DataLoader:
        self.source.trainer = self.trainer
        return self.source.val_dataloader()


def as_lightning(datamodule: DiffusionDataModule | L.LightningDataModule) -> L.LightningDataModule:
    """`datamodule` as the Trainer takes it (unchanged if it already is a LightningDataModule)."""
    return datamodule if isinstance(datamodule, L.LightningDataModule) else LightningData(datamodule)
