"""Image quantisation and PNG files: single images by seed, and sample grids."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor


def to_uint8(x: Tensor) -> Tensor:
    """[-1, 1] float -> uint8 in [0, 255], the quantisation of saved images (EDM generate.py)."""
    return (x * 127.5 + 128).clip(0, 255).to(torch.uint8)


def from_uint8(x: Tensor) -> Tensor:
    """uint8 -> float32 in [-1, 1]; `to_uint8` inverts it exactly."""
    return x.to(torch.float32) / 127.5 - 1


def save_grid(images_uint8: Tensor, path: str | Path, nrow: int | None = None, scale: int = 1) -> Path:
    """Write uint8 images (N, C, H, W) as one PNG grid (nrow images per row, default about sqrt(N)).

    scale: enlarge every pixel to a scale x scale block (nearest neighbour), so tiny images stay legible.
    """
    if images_uint8.dtype != torch.uint8 or images_uint8.ndim != 4:
        raise ValueError(f"expected uint8 images (N, C, H, W), got {images_uint8.dtype} {tuple(images_uint8.shape)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nrow = nrow or math.ceil(math.sqrt(len(images_uint8)))
    images_uint8 = images_uint8.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    from torchvision.utils import save_image  # 3 s of imports, only when a grid is written

    # k / 255 * 255 + 0.5 truncates back to k in save_image: the PNG holds the uint8 values exactly.
    save_image(images_uint8.float() / 255, path, nrow=nrow)
    return path


def png_path(folder: Path, seed: int, per_folder: int) -> Path:
    """<folder>/[<first seed of its subfolder:06d>/]<seed:06d>.png."""
    return (folder / f"{seed // per_folder * per_folder:06d}" if per_folder else folder) / f"{seed:06d}.png"


def write_pngs(images: Tensor, seeds: Tensor, folder: Path, per_folder: int) -> None:
    """uint8 images (N, C, H, W), one PNG per seed (grey or RGB)."""
    for img, seed in zip(images.permute(0, 2, 3, 1).numpy(), seeds.tolist()):
        path = png_path(folder, seed, per_folder)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(path)
