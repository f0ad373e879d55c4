"""Reference statistics of any image folder or zip, and the Fréchet distance of any folder of images to them (edm's
fid.py `ref` and `calc`), on one process.

    python -m evodiff_pl.evaluation.fid ref --data=DIR_OR_ZIP --dest=ref.npz [--feature=inception|dinov2]
    python -m evodiff_pl.evaluation.fid calc --images=DIR_OR_ZIP --ref=ref.npz [--feature=...] [--num=50000]

(console script: `evodiff-fid`). `ref` writes edm's `.npz` (float64 `mu` (d,) and `sigma` (d, d), unbiased), which
`calc`, `sample.py stats=` and edm's own fid.py read. Images are read with `evodiff_pl.data.image_files` (png, jpg,
webp, bmp, recursively, sorted by path; centre-cropped to a square of the first image's size), grey ones repeated to
RGB by the extractor. Feature weights: `--weights=PATH` (InceptionV3: torch-fidelity's file; DINOv2: its
ViT-L/14 file), needed offline.
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from evodiff_pl.data.image_files import DataError, DatasetNotFoundError, ImageFiles, ImageFilesDataset
from evodiff_pl.evaluation.dinov2 import DINOv2WeightsError
from evodiff_pl.evaluation.metrics import FrechetScore, InceptionWeightsError
from evodiff_pl.io.nvlabs import read_mu_sigma_npz
from evodiff_pl.utils.fileio import atomic_write

FEATURES = ("inception", "dinov2")
ERRORS = (DataError, DatasetNotFoundError, InceptionWeightsError, DINOv2WeightsError, ValueError)
"""Reported as one line by `main`."""


def images(root: str | Path) -> ImageFilesDataset:
    """The images under `root`, a folder or .zip file, at the first image's size and channels (1 or 3)."""
    files = ImageFiles(root)
    with Image.open(io.BytesIO(files.read(files.names[0]))) as first:
        channels, size = (1 if first.mode in ("L", "I;16", "1") else 3), min(first.size)
    return ImageFilesDataset(files, [0] * len(files.names), size, channels)


def image_batches(data: ImageFilesDataset, batch: int, num: int | None = None) -> Iterator[Tensor]:
    """uint8 (B, C, H, W) batches of the first `num` (None: all) images of `data`."""
    n = len(data) if num is None else min(num, len(data))
    for start in range(0, n, batch):
        yield torch.stack([data[i][0] for i in range(start, min(start + batch, n))])


def mu_sigma(stats: dict[str, Tensor]) -> tuple[np.ndarray, np.ndarray]:
    """Mean and unbiased covariance (float64) from running sums of features (sum, outer_sum, count)."""
    n = int(stats["count"])
    if n < 2:
        raise ValueError(f"need at least 2 images for a covariance, got {n}")
    mu = stats["sum"].double() / n
    # unbiased covariance: (Σ x xᵀ − n·mu muᵀ) / (n − 1), as edm's fid.py
    sigma = (stats["outer_sum"].double() - n * torch.outer(mu, mu)) / (n - 1)
    return mu.numpy(), sigma.numpy()


def _score(args: argparse.Namespace) -> FrechetScore:
    device = torch.device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu")
    return FrechetScore(args.feature, num_samples=2, weights_path=args.weights, batch_size=args.batch).to(device)


def ref(args: argparse.Namespace) -> str:
    """Write the statistics of --data to --dest; returns the message."""
    data = images(args.data)
    score = _score(args)
    stats = score.real_statistics(image_batches(data, args.batch, args.num))
    mu, sigma = mu_sigma(stats)
    atomic_write(Path(args.dest), lambda f: np.savez(f, mu=mu, sigma=sigma))
    return f"{args.dest}: {score.feature_name} statistics of {int(stats['count'])} images from {args.data}"


def calc(args: argparse.Namespace) -> str:
    """The distance of --images to the statistics in --ref; returns the message."""
    data = images(args.images)
    score = _score(args)
    score.load_real(read_mu_sigma_npz(args.ref, score.metric.inception.num_features))
    count = 0
    for batch in image_batches(data, args.batch, args.num):
        score.update(batch)
        count += len(batch)
    score.num_samples = count
    return f"{score.name} = {score.compute():.6g} ({args.images} against {args.ref})"


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evodiff-fid", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    for name, source, help_ in (("ref", "data", "write reference statistics"), ("calc", "images", "score images")):
        s = sub.add_parser(name, help=help_)
        s.add_argument(f"--{source}", required=True, help="image folder or .zip")
        s.add_argument("--dest" if name == "ref" else "--ref", required=True, help="statistics .npz (mu, sigma)")
        s.add_argument("--feature", choices=FEATURES, default="inception", help="feature network (default inception)")
        s.add_argument("--weights", default=None, help="local weights of the feature network (needed offline)")
        s.add_argument("--num", type=int, default=None, help="use the first NUM images (default all)")
        s.add_argument("--batch", type=int, default=64, help="images per feature-network call")
        s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run `ref` or `calc`; known errors print one line and return 1."""
    args = parser().parse_args(argv)
    if args.batch < 1 or (args.num is not None and args.num < 2):
        print(f"error: need --batch >= 1 and --num >= 2, got {args.batch} and {args.num}", file=sys.stderr)
        return 1
    try:
        print(ref(args) if args.command == "ref" else calc(args), flush=True)
    except ERRORS as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
