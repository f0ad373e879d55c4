"""The data stream of diffusion training: the datamodule base every dataset builds on (`datasets`).

It does not import Lightning (sample.py reads datasets without it); `evodiff_pl.training.datamodule.as_lightning`
gives the Trainer its LightningDataModule view.

Every module yields training batches `(x, labels)`: x float32 of shape (B, *shape) (images in
[-1, 1]), labels int64 (B,); labels are returned even when `num_classes == 0` (the model then
ignores them). `real_images()` is the reference data for Fréchet-distance statistics.

Held-out split (`holdout=N`): N samples, chosen by a fixed permutation (seed 0, independent of the run's seed),
are kept out of training; the validation loss is measured on them, so it can show over-fitting. Training,
`real_images()` and the statistics key then refer to the remaining samples. For the digits, `holdout=450` holds
out exactly the test split of `evodiff_pl.evaluation.classifier.digits_split`.

Data order and resume: the train loader is an endless stream of global batches, the same for any number of
processes. The stream visits the permutations of epochs 0, 1, ... (epoch e: the permutation drawn from
(seed, e)), `batch_size` is the global batch and process r of W takes global positions start + r,
start + r + W, ... (`InfiniteSampler`), so rank r's sample k of a batch is the batch's sample k*W + r. The
stream starts at any sample position (`stream_from`), so a resumed run continues exactly where the checkpoint
left off. Lightning must not shard it (`Trainer(use_distributed_sampler=False)`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import ClassVar

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from evodiff_pl.data.image_files import DataError
from evodiff_pl.utils.images import from_uint8, to_uint8
from evodiff_pl.utils.seeding import derive_seed


class InfiniteSampler(Sampler[int]):
    """Endless index stream: the permutations of epochs 0, 1, ... (epoch e drawn from (seed, e)) concatenated;
    process `rank` of `world_size` takes global positions start + rank, start + rank + world_size, ..."""

    def __init__(self, n: int, seed: int, rank: int = 0, world_size: int = 1, start: int = 0) -> None:
        if not 0 <= rank < world_size or start < 0 or n < 1:
            raise ValueError(
                f"need n >= 1, 0 <= rank < world_size and start >= 0; got {n}, {rank}, {world_size}, {start}"
            )
        self.n = n
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.start = start

    def __iter__(self) -> Iterator[int]:
        pos, epoch, perm = self.start + self.rank, -1, []
        while True:
            e, i = divmod(pos, self.n)
            if e != epoch:
                g = torch.Generator().manual_seed(derive_seed(self.seed, e))
                epoch, perm = e, torch.randperm(self.n, generator=g).tolist()
            yield perm[i]
            pos += self.world_size


class _Images(Dataset):
    """(x float32 in [-1, 1], label) from a dataset of uint8 or [-1, 1] images.

    With `hflip`, the dataset is doubled and index i >= N is the mirror image of i - N (EDM's
    xflip), so augmentation follows the sampler's seeded order and needs no random state.
    """

    def __init__(self, base: Dataset, hflip: bool) -> None:
        self.base = base
        self.hflip = hflip

    def __len__(self) -> int:
        return len(self.base) * (2 if self.hflip else 1)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor | int]:
        n = len(self.base)
        x, y = self.base[i % n]
        if x.dtype == torch.uint8:
            x = from_uint8(x)
        return (x.flip(-1) if i >= n else x), y


class DiffusionDataModule:
    """Common base: a seeded, resumable train loader, a one-batch val loader and the reference data.

    Subclasses set `shape` and `num_classes` in `__init__` and implement `_load()` (the
    un-augmented dataset in a fixed order) and `stats_key()`.
    """

    name: ClassVar[str]
    is_image: ClassVar[bool]

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, holdout: int = 0,
                 pin_memory: bool = False, prepare_per_node: bool = True, augment: float = 0.0,
                 batch_gpu: int | None = None) -> None:
        """
        Args:
            batch_size: the global batch, split evenly over the processes.
            num_workers: DataLoader worker processes; 0 (load in the main process) suits the
                in-memory datasets, raise it for image_folder.
            seed: seed of the data order (see the module docstring).
            holdout: samples kept out of training for the validation loss (module docstring); 0 = none.
            pin_memory: page-locked loader batches (faster, asynchronous copies to a GPU).
            prepare_per_node: download on one process per node; false: on one process in all (set it when the
                data root is on a filesystem shared by the nodes, so they do not download into it at once).
            augment: probability of EDM's non-leaky geometric augmentation (`evodiff_pl.data.augment`; EDM's CIFAR-10:
                0.12), applied by the training module on the device; 0 = off. Images only.
            batch_gpu: the most samples one process puts through the network at once (edm's --batch-gpu; None: its
                whole share of the batch); the share is reached by gradient accumulation, with the same result up
                to rounding (`evodiff_pl.training.accumulate`). Must divide batch_size / processes (or exceed it: one round).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if batch_gpu is not None and batch_gpu < 1:
            raise ValueError(f"batch_gpu must be >= 1 (or null: no cap), got {batch_gpu}")
        if holdout < 0:
            raise ValueError(f"holdout must be >= 0, got {holdout}")
        if num_workers < 0:
            raise ValueError(f"num_workers must be >= 0 (0 loads in the main process), got {num_workers}")
        if not 0 <= augment <= 1:
            raise ValueError(f"augment={augment} must be in [0, 1] (a probability; 0 = off)")
        if augment and not self.is_image:
            raise ValueError(f"augment={augment}: augmentation needs images, {self.name} holds vectors")
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.holdout = holdout
        self.pin_memory = pin_memory
        self.prepare_data_per_node = prepare_per_node
        self.augment = float(augment)
        self.batch_gpu = batch_gpu
        self.shape: tuple[int, ...] = ()
        self.num_classes = 0
        self._data: Dataset | None = None
        self._heldout: Dataset | None = None
        self._stream_start = 0
        self.trainer = None
        """Set by the Trainer's view (`as_lightning`): the process's rank and world size for the train loader."""

    def prepare_data(self) -> None:
        """Download what `_load` needs (subclasses), on the processes `prepare_data_per_node` names."""

    def _load(self) -> Dataset:
        """The un-augmented dataset of (x, label), x uint8 or float32 in [-1, 1] (images) or float32 (vectors)."""
        raise NotImplementedError

    def _stats_key(self) -> str:
        """`stats_key` of the whole dataset (subclasses)."""
        raise NotImplementedError

    def stats_key(self) -> str:
        """A stable string naming the reference data (dataset, resolution, subset, held-out split) for caching
        statistics. It does not include the number of samples used: callers add it if they use `real_images(max_n)`.
        """
        return self._stats_key() + (f"-holdout{self.holdout}" if self.holdout else "")

    def setup(self, stage: str | None = None) -> None:
        if self._data is None:
            data = self._load()
            if self.holdout:
                if self.holdout >= len(data):
                    raise DataError(f"{self.name}: holdout={self.holdout} leaves no training data ({len(data)} samples)")
                order = torch.randperm(len(data), generator=torch.Generator().manual_seed(0))
                self._heldout = Subset(data, order[len(data) - self.holdout:].sort().values.tolist())
                data = Subset(data, order[: len(data) - self.holdout].sort().values.tolist())
            if len(data) < self.batch_size:
                raise DataError(
                    f"{self.name}: {len(data)} training samples < batch_size={self.batch_size}; no full batch can be "
                    "drawn"
                )
            self._data = data

    @property
    def data(self) -> Dataset:
        """The un-augmented training data in its fixed order, loaded on first use."""
        self.setup()
        return self._data

    @property
    def heldout(self) -> Dataset | None:
        """The un-augmented held-out samples in their fixed order (None without `holdout`)."""
        self.setup()
        return self._heldout

    def view(self, augment: bool = False, heldout: bool = False) -> Dataset:
        """The training (or held-out) data as seen by the loaders: float samples, augmented if requested."""
        return self.heldout if heldout else self.data

    def _loader(self, dataset: Dataset, batch_size: int | None = None, **kwargs) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size if batch_size is None else batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=self.pin_memory,
            **kwargs,
        )

    def stream_from(self, position: int = 0) -> None:
        """Start the training stream (module docstring) at global sample `position` (a resumed run's images seen)."""
        if position < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self._stream_start = position

    def train_dataloader(self) -> DataLoader:
        """The endless global-batch stream from the `stream_from` position, already split over processes."""
        dataset = self.view(augment=True)
        rank, world = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        if self.batch_size % world:
            raise ValueError(f"batch_size={self.batch_size} (the global batch) is not divisible by {world} processes")
        return self._loader(
            dataset,
            batch_size=self.batch_size // world,
            sampler=InfiniteSampler(len(dataset), self.seed, rank, world, start=self._stream_start),
            generator=torch.Generator().manual_seed(self.seed),
        )

    def val_dataloader(self) -> DataLoader:
        """One un-augmented batch for the validation loss: the first `batch_size` held-out samples with `holdout`,
        else the first training samples (sample quality is measured by the evaluation callback)."""
        source = self.view(heldout=self.heldout is not None)
        return self._loader(Subset(source, range(min(self.batch_size, len(source)))))

    def real_images(self, max_n: int | None = None) -> Tensor:
        """The first `max_n` samples (all if None or larger than the dataset) in the fixed order.

        Images: uint8 (N, C, H, W), quantised with `to_uint8` like generated images; vectors: float32 (N, D).
        """
        n = len(self.data) if max_n is None else min(max_n, len(self.data))
        if n < 1:
            raise ValueError(f"max_n must be >= 1, got {max_n}")
        loader = DataLoader(Subset(self.data, range(n)), batch_size=1024, num_workers=self.num_workers)
        x = torch.cat([batch[0] for batch in loader])
        if self.is_image and x.dtype != torch.uint8:
            x = to_uint8(x)
        return x


class ImageDataModule(DiffusionDataModule):
    """Images in [-1, 1] with optional EDM-style horizontal-flip augmentation."""

    is_image = True

    def __init__(self, hflip: bool = False, **kwargs) -> None:
        """
        Args:
            hflip: double the training set with mirrored copies (EDM's --xflip); validation and
                `real_images` are never flipped.
            **kwargs: `DiffusionDataModule` options.
        """
        super().__init__(**kwargs)
        self.hflip = hflip

    def view(self, augment: bool = False, heldout: bool = False) -> Dataset:
        return _Images(self.heldout if heldout else self.data, hflip=self.hflip and augment)
