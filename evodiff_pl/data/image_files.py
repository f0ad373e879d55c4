"""Image files on disk for `image_folder`: a folder (searched recursively) or a zip archive, and their class labels.

Reads the output of NVlabs edm's `dataset_tool.py` as it is: a folder or an uncompressed zip of PNGs named
`00000/img00000000.png`, ... with a `dataset.json` at the top, `{"labels": [["00000/img00000000.png", 6], ...]}`
(or `{"labels": null}` for an unlabelled dataset). Files are named by their POSIX path relative to the root, in
sorted order, as edm's training code orders them, so label i belongs to image i in both.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
LABELS_FILE = "dataset.json"
MAX_CLASSES = 100_000
"""Class indices in dataset.json must be below this (num_classes = largest index + 1 sizes the label input)."""
"""edm's label file at the top of a dataset folder or zip."""


class DatasetNotFoundError(FileNotFoundError):
    """The dataset is not on disk and could not be obtained; the message says how to provide it."""


class DataError(ValueError):
    """The dataset cannot be used as configured (too small for the batch, an unreadable file); the message says why."""


def _is_image(name: str) -> bool:
    return Path(name).suffix.lower() in IMAGE_EXTENSIONS


class ImageFiles:
    """The image files under `root`, a folder or a `.zip` file; picklable (the archive is reopened per process)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).expanduser().resolve()
        exts = ", ".join(IMAGE_EXTENSIONS)
        if self.root.is_dir():
            everything = [p.relative_to(self.root).as_posix() for p in self.root.rglob("*") if p.is_file()]
        elif self.root.is_file() and self.root.suffix.lower() == ".zip":
            try:
                with zipfile.ZipFile(self.root) as z:
                    everything = [n for n in z.namelist() if not n.endswith("/")]
            except (zipfile.BadZipFile, OSError) as err:
                raise DataError(f"cannot read the zip archive {self.root}: {err}") from None
        else:
            raise DatasetNotFoundError(f"image folder {self.root} does not exist, nor is it a .zip file (looked for "
                                       f"{exts} images)")
        self.names = sorted(n for n in everything if _is_image(n))
        """Image paths relative to the root, POSIX separators, sorted."""
        if not self.names:
            raise DatasetNotFoundError(f"no images found under {self.root} (searched recursively for {exts})")
        self.has_labels_file = LABELS_FILE in everything
        self._zip: zipfile.ZipFile | None = None

    @property
    def is_zip(self) -> bool:
        return not self.root.is_dir()

    def read(self, name: str) -> bytes:
        """The bytes of the file `name` (relative to the root)."""
        if not self.is_zip:
            return (self.root / name).read_bytes()
        if self._zip is None:
            self._zip = zipfile.ZipFile(self.root)
        return self._zip.read(name)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_zip": None}

    def edm_labels(self) -> list[int] | None:
        """The integer class label of every image from edm's `dataset.json`; None when it stores `"labels": null`."""
        where = f"{self.root}/{LABELS_FILE}" if not self.is_zip else f"{LABELS_FILE} in {self.root}"
        try:
            labels = json.loads(self.read(LABELS_FILE))["labels"]
        except (ValueError, KeyError, TypeError) as err:
            raise DataError(f"{where} is not edm's label file {{\"labels\": [[file, class], ...] or null}}: "
                            f"{type(err).__name__}: {err}") from None
        if labels is None:
            return None
        if not isinstance(labels, list) or not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], str)
                                                   for e in labels):
            raise DataError(f"{where}: \"labels\" must be a list of [file, class] pairs or null")
        table = dict(labels)
        missing = [n for n in self.names if n not in table]
        if missing:
            raise DataError(f"{where} has no label for {len(missing)} of {len(self.names)} images, e.g. {missing[0]}")
        values = [table[n] for n in self.names]
        bad = next((v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 0), None)
        if bad is not None:
            raise DataError(f"{where}: labels must be class indices (integers >= 0), got {bad!r}")
        if max(values, default=0) >= MAX_CLASSES:
            raise DataError(f"{where}: class index {max(values)} is too large (at most {MAX_CLASSES - 1}: the number "
                            "of classes is the largest index + 1)")
        return values


class ImageFilesDataset(Dataset):
    """Images of an `ImageFiles` decoded on access: centre-cropped to a square, Lanczos-resized, uint8 (C, R, R)."""

    def __init__(self, files: ImageFiles, labels: list[int], resolution: int, channels: int) -> None:
        self.files = files
        self.labels = labels
        self.resolution = resolution
        self.mode = "L" if channels == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.files.names)

    def __getitem__(self, i: int) -> tuple[Tensor, int]:
        name = self.files.names[i]
        try:
            with Image.open(io.BytesIO(self.files.read(name))) as img:
                img = img.convert(self.mode)
        except (OSError, SyntaxError, ValueError, zipfile.BadZipFile, Image.DecompressionBombError) as err:
            # truncated, corrupt, not an image, or more pixels than PIL's limit (Image.MAX_IMAGE_PIXELS)
            where = f"{name} in {self.files.root}" if self.files.is_zip else self.files.root / name
            raise DataError(f"cannot read image {where}: {err}") from None
        w, h = img.size
        s = min(w, h)
        img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        img = img.resize((self.resolution, self.resolution), Image.Resampling.LANCZOS)
        x = torch.from_numpy(np.array(img, dtype=np.uint8))
        x = x[None] if x.ndim == 2 else x.permute(2, 0, 1)
        return x.contiguous(), self.labels[i]
