"""LightningDataModules for diffusion training, built by name from config (`build_datamodule`).

Every module yields training batches `(x, labels)`: x float32 of shape (B, *shape) (images in
[-1, 1]), labels int64 (B,); labels are returned even when `num_classes == 0` (the model then
ignores them). `real_images()` is the reference data for Fréchet-distance statistics.

Held-out split (`holdout=N`): N samples, chosen by a fixed permutation (seed 0, independent of the run's seed),
are kept out of training; the validation loss is measured on them, so it can show over-fitting. Training,
`real_images()` and the statistics key then refer to the remaining samples. For the digits, `holdout=450` holds
out exactly the test split of `evodiff_pl.classifier.digits_split`.

Data order and resume: the train loader is an endless stream of global batches, the same for any number of
processes. The stream visits the permutations of epochs 0, 1, ... (epoch e: the permutation drawn from
(seed, e)), `batch_size` is the global batch and process r of W takes global positions start + r,
start + r + W, ... (`InfiniteSampler`), so rank r's sample k of a batch is the batch's sample k*W + r. The
stream starts at any sample position (`stream_from`), so a resumed run continues exactly where the checkpoint
left off. Lightning must not shard it (`Trainer(use_distributed_sampler=False)`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal
from urllib.error import URLError

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, TensorDataset
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from evodiff_pl.downloads import download_timeout
from evodiff_pl.image_files import DataError, DatasetNotFoundError, ImageFiles, ImageFilesDataset
from evodiff_pl.images import from_uint8, to_uint8
from evodiff_pl.seeding import derive_seed
from evodiff_pl.toy import GaussianMixture

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


def default_data_root() -> Path:
    """$EVODIFF_DATA if set, else ~/.cache/evodiff-pl/data."""
    return Path(os.environ.get("EVODIFF_DATA", "~/.cache/evodiff-pl/data")).expanduser()


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


class DiffusionDataModule(L.LightningDataModule):
    """Common base: a seeded, resumable train loader, a one-batch val loader and the reference data.

    Subclasses set `shape` and `num_classes` in `__init__` and implement `_load()` (the
    un-augmented dataset in a fixed order) and `stats_key()`.
    """

    name: ClassVar[str]
    is_image: ClassVar[bool]

    def __init__(self, batch_size: int = 128, num_workers: int = 0, seed: int = 0, holdout: int = 0,
                 pin_memory: bool = False, prepare_per_node: bool = True, augment: float = 0.0) -> None:
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
            augment: probability of EDM's non-leaky geometric augmentation (`evodiff_pl.augment`; EDM's CIFAR-10:
                0.12), applied by the training module on the device; 0 = off. Images only.
        """
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
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
        self.shape: tuple[int, ...] = ()
        self.num_classes = 0
        self._data: Dataset | None = None
        self._heldout: Dataset | None = None
        self._stream_start = 0

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


class _ImageDataModule(DiffusionDataModule):
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


class DigitsDataModule(_ImageDataModule):
    """scikit-learn's bundled 8x8 digits (1,797 images, grey levels 0..16), offline; the default dataset."""

    name = "digits"

    def __init__(
        self,
        resolution: int = 8,
        resize_mode: Literal["pad", "resize"] = "pad",
        conditional: bool = False,
        hflip: bool = False,
        **kwargs,
    ) -> None:
        """
        Args:
            resolution: side of the returned images; 8 is native.
            resize_mode: "pad" centres the 8x8 digit on a background of -1 (resolution >= 8);
                "resize" resamples bilinearly (antialiased when shrinking).
            conditional: class-conditional (num_classes=10); the digit labels are returned either way.
            hflip: mirror augmentation; off by default since digits are not mirror-symmetric.
            **kwargs: `DiffusionDataModule` options.
        """
        super().__init__(hflip=hflip, **kwargs)
        if resize_mode not in ("pad", "resize"):
            raise ValueError(f"resize_mode must be 'pad' or 'resize', got {resize_mode!r}")
        if resolution < (8 if resize_mode == "pad" else 1):
            raise ValueError(f"resolution={resolution} is too small for resize_mode={resize_mode!r}")
        self.resolution = resolution
        self.resize_mode = resize_mode
        self.shape = (1, resolution, resolution)
        self.num_classes = 10 if conditional else 0

    def _load(self) -> Dataset:
        digits = load_digits()
        x = torch.from_numpy(digits.images / 16 * 2 - 1).to(torch.float32)[:, None]
        labels = torch.from_numpy(digits.target).to(torch.int64)
        r = self.resolution
        if r != 8 and self.resize_mode == "pad":
            lo = (r - 8) // 2
            x = F.pad(x, (lo, r - 8 - lo, lo, r - 8 - lo), value=-1.0)
        elif r != 8:
            x = F.interpolate(x, size=(r, r), mode="bilinear", align_corners=False, antialias=r < 8)
        return TensorDataset(x, labels)

    def _stats_key(self) -> str:
        return "digits-8px" if self.resolution == 8 else f"digits-{self.resolution}px-{self.resize_mode}"


def _read_cifar10_train(folder: Path) -> tuple[Tensor, Tensor]:
    """The five CIFAR-10 python training batches as uint8 (50000, 3, 32, 32) and int64 labels."""
    images, labels = [], []
    for fname in _CIFAR_TRAIN_FILES:
        with open(folder / fname, "rb") as f:
            batch = pickle.load(f, encoding="latin1")
        images.append(batch["data"])
        labels.extend(batch["labels"])
    x = torch.from_numpy(np.concatenate(images)).reshape(-1, 3, 32, 32)
    return x, torch.tensor(labels, dtype=torch.int64)


class CIFAR10DataModule(_ImageDataModule):
    """CIFAR-10 training set (50,000 32x32 RGB images) in torchvision's python format."""

    name = "cifar10"

    def __init__(
        self,
        root: str | Path | None = None,
        download: bool = True,
        conditional: bool = False,
        hflip: bool = False,
        **kwargs,
    ) -> None:
        """
        Args:
            root: folder containing `cifar-10-batches-py`; default `default_data_root()`.
            download: fetch `cifar-10-python.tar.gz` into root when the batches are missing (uses
                an md5-checked tarball already in root without network); set false on offline nodes.
            conditional: class-conditional (num_classes=10); labels are returned either way.
            hflip: mirror augmentation. Off by default: EDM's CIFAR-10 runs flip inside their
                augmentation pipeline instead of with --xflip.
            **kwargs: `DiffusionDataModule` options.
        """
        super().__init__(hflip=hflip, **kwargs)
        self.root = Path(root).expanduser() if root is not None else default_data_root()
        self.download = download
        self.shape = (3, 32, 32)
        self.num_classes = 10 if conditional else 0

    def _ensure_on_disk(self) -> Path:
        folder = self.root / _CIFAR_DIR
        if all((folder / f).is_file() for f in _CIFAR_TRAIN_FILES):
            return folder
        reason = "download disabled (data.download=false)"
        if self.download:
            try:
                with download_timeout() as seconds:
                    download_and_extract_archive(
                        CIFAR10.url, str(self.root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5
                    )
                return folder
            except (URLError, RuntimeError, OSError) as err:
                reason = f"download failed ({seconds:g} s timeout): {type(err).__name__}: {err}"
        raise DatasetNotFoundError(
            f"CIFAR-10 not found in {self.root} and could not be downloaded ({reason}). Download "
            f"{CIFAR10.filename} ({CIFAR10.url}) elsewhere and either put it in {self.root} or extract it "
            f"and pass data.root=/path (the folder containing {_CIFAR_DIR}); "
            "on offline machines also set data.download=false."
        )

    def prepare_data(self) -> None:
        """Download on one process per node (Lightning calls this before `setup`)."""
        self._ensure_on_disk()

    def _load(self) -> Dataset:
        return TensorDataset(*_read_cifar10_train(self._ensure_on_disk()))

    def _stats_key(self) -> str:
        return "cifar10-32px-train"


class ImageFolderDataModule(_ImageDataModule):
    """Any folder or zip of images, searched recursively (edm's `dataset_tool.py` output included, see
    `evodiff_pl.image_files`); class labels from edm's dataset.json or from ImageFolder-style subfolders."""

    name = "image_folder"

    def __init__(
        self,
        root: str | Path,
        resolution: int = 64,
        channels: Literal[1, 3] = 3,
        labels: bool = False,
        hflip: bool = False,
        **kwargs,
    ) -> None:
        """
        Args:
            root: the folder or .zip file; files with an extension in image_files.IMAGE_EXTENSIONS are used, in
                sorted path order.
            resolution: side of the square images (centre crop, then Lanczos resize as EDM's dataset_tool).
            channels: 1 (greyscale) or 3 (RGB).
            labels: the class labels of edm's dataset.json when the root holds one (num_classes = largest + 1), else
                the index of the sorted top-level subfolder holding the image (num_classes = number of subfolders);
                false: all labels 0, unconditional.
            hflip: mirror augmentation.
            **kwargs: `DiffusionDataModule` options.
        """
        super().__init__(hflip=hflip, **kwargs)
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        self.files = ImageFiles(root)
        self.root = self.files.root
        if labels and self.files.has_labels_file:
            edm_labels = self.files.edm_labels()
            if edm_labels is None:
                raise DataError(f"labels=true, but the dataset.json of {self.root} stores no labels (\"labels\": null)")
            self.classes = [str(c) for c in range(max(edm_labels) + 1)]
            self.labels = edm_labels
        elif labels:
            top = [name.split("/") for name in self.files.names]
            if any(len(parts) == 1 for parts in top):
                raise ValueError(f"labels=true needs every image inside a class subfolder of {self.root}")
            self.classes = sorted({parts[0] for parts in top})
            index = {c: i for i, c in enumerate(self.classes)}
            self.labels = [index[parts[0]] for parts in top]
        else:
            self.classes = []
            self.labels = [0] * len(self.files.names)
        self.resolution = resolution
        self.channels = channels
        self.shape = (channels, resolution, resolution)
        self.num_classes = len(self.classes)

    def _load(self) -> Dataset:
        return ImageFilesDataset(self.files, self.labels, self.resolution, self.channels)

    def _stats_key(self) -> str:
        path_hash = hashlib.sha1(str(self.root).encode()).hexdigest()[:8]
        n = len(self.files.names)
        return f"image_folder-{self.root.name}-{path_hash}-n{n}-{self.resolution}px-{self.channels}ch"


class GMMDataModule(DiffusionDataModule):
    """Samples of the analytic Gaussian-mixture testbed (`evodiff_pl.toy`); labels are component ids."""

    name = "gmm"
    is_image = False

    def __init__(
        self,
        dim: int = 64,
        n_components: int = 8,
        mixture_seed: int = 0,
        num_train: int = 65536,
        **kwargs,
    ) -> None:
        """
        Args:
            dim: dimension of the vectors.
            n_components: mixture components.
            mixture_seed: seed of `GaussianMixture.default` (and of the training draw).
            num_train: samples drawn once (float32) to form the training set.
            **kwargs: `DiffusionDataModule` options.
        """
        super().__init__(**kwargs)
        self.mixture = GaussianMixture.default(dim=dim, n_components=n_components, seed=mixture_seed)
        self.mixture_seed = mixture_seed
        self.num_train = num_train
        self.shape = (dim,)

    def _load(self) -> Dataset:
        g = torch.Generator().manual_seed(derive_seed(self.mixture_seed))
        x, k = self.mixture.sample(self.num_train, generator=g, return_labels=True)
        return TensorDataset(x.to(torch.float32), k.to(torch.int64))

    def _stats_key(self) -> str:
        m = self.mixture
        return f"gmm-d{m.dim}-k{m.n_components}-s{self.mixture_seed}-n{self.num_train}"


DATASETS: dict[str, type[DiffusionDataModule]] = {
    m.name: m for m in (DigitsDataModule, CIFAR10DataModule, ImageFolderDataModule, GMMDataModule)
}


def build_datamodule(name: str, **kwargs) -> DiffusionDataModule:
    """The datamodule registered as `name`, constructed with `kwargs` (its documented options)."""
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; valid names: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kwargs)


def build_from_config(data: Mapping[str, Any], seed: int) -> DiffusionDataModule:
    """The datamodule of a `data` config section (`name` plus its options), seeded by `seed` unless it sets one."""
    kwargs = dict(data)
    name = kwargs.pop("name")
    kwargs.setdefault("seed", seed)
    return build_datamodule(name, **kwargs)
