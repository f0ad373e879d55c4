"""The datasets: digits, CIFAR-10, an image folder or zip, the Gaussian mixture; built by name from config
(`build_datamodule`, `build_from_config`), each a `DiffusionDataModule` (`evodiff_pl.data.stream`)."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal
from urllib.error import URLError

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset, TensorDataset

from evodiff_pl.data.image_files import DataError, DatasetNotFoundError, ImageFiles, ImageFilesDataset
from evodiff_pl.data.stream import DiffusionDataModule, ImageDataModule
from evodiff_pl.toy import GaussianMixture
from evodiff_pl.utils.downloads import download_timeout
from evodiff_pl.utils.seeding import derive_seed

__all__ = ["CIFAR10DataModule", "DATASETS", "DataError", "DatasetNotFoundError", "DigitsDataModule", "GMMDataModule",
           "ImageFolderDataModule", "build_datamodule", "build_from_config", "default_data_root"]

_CIFAR_DIR = "cifar-10-batches-py"
_CIFAR_TRAIN_FILES = tuple(f"data_batch_{i}" for i in range(1, 6))


def download_and_extract_archive(url: str, download_root: str, filename: str, md5: str) -> None:
    """torchvision's `download_and_extract_archive`, imported on first use (torchvision takes seconds to import)."""
    from torchvision.datasets.utils import download_and_extract_archive as download

    download(url, download_root, filename=filename, md5=md5)


def default_data_root() -> Path:
    """$EVODIFF_DATA if set, else ~/.cache/evodiff-pl/data."""
    return Path(os.environ.get("EVODIFF_DATA", "~/.cache/evodiff-pl/data")).expanduser()


class DigitsDataModule(ImageDataModule):
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
        from sklearn.datasets import load_digits  # 2 s of imports, only when the digits are read

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


class CIFAR10DataModule(ImageDataModule):
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
        from torchvision.datasets import CIFAR10  # 3 s of imports, only when the files are missing

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


class ImageFolderDataModule(ImageDataModule):
    """Any folder or zip of images, searched recursively (edm's `dataset_tool.py` output included, see
    `evodiff_pl.data.image_files`); class labels from edm's dataset.json or from ImageFolder-style subfolders."""

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
        for key, value in (("dim", dim), ("n_components", n_components), ("num_train", num_train)):
            if not value >= 1:
                raise DataError(f"{key} must be >= 1, got {value}")
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
