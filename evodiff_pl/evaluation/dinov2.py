"""DINOv2 ViT-L/14 features for FD-DINOv2 (Stein et al. 2023), preprocessed as NVlabs edm2's calculate_metrics.py.

uint8 images are resized to 224x224 (bicubic with antialiasing, on 0..255 values), scaled to [0, 1], normalised with
the ImageNet mean and std and passed through DINOv2 ViT-L/14, whose output is the 1024-d class-token feature. The
architecture comes from torch.hub (`facebookresearch/dinov2`, its code cached under $TORCH_HOME/hub after one online
use); the weights from a local file on offline nodes (`DINOV2_FILE`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from evodiff_pl.utils.downloads import download_timeout

DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2/dinov2_vitl14/dinov2_vitl14_pretrain.pth"
DINOV2_FILE = DINOV2_URL.rsplit("/", 1)[1]
DINOV2_REPO = "facebookresearch/dinov2:main"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

_OFFLINE_HINT = (f"on an offline node download {DINOV2_URL} elsewhere and pass its path (sample.py: "
                 f"dinov2_weights=/path/{DINOV2_FILE}, train.py: evaluation.weights_path=...), with the code of "
                 f"torch.hub's {DINOV2_REPO} cached under $TORCH_HOME/hub")


class DINOv2WeightsError(FileNotFoundError, RuntimeError):
    """The DINOv2 network or its weights are missing or unreadable; the message says what to pass."""


def load_dinov2(weights_path: str | os.PathLike | None = None) -> nn.Module:
    """DINOv2 ViT-L/14 in eval mode: torch.hub's architecture with the weights of `weights_path` (None: torch.hub's
    download); DINOv2WeightsError (one line) when either cannot be had."""
    path = None if weights_path is None else Path(weights_path).expanduser()
    if path is not None and not path.is_file():
        raise DINOv2WeightsError(f"DINOv2 weights file {path} does not exist; {_OFFLINE_HINT}")
    try:
        with download_timeout():
            model = torch.hub.load(DINOV2_REPO, "dinov2_vitl14", pretrained=path is None, trust_repo=True,
                                   skip_validation=True, verbose=False)
            if path is not None:
                model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
    except Exception as err:  # no network, no cached code, a wrong or truncated file: all mean the same to the user
        first = str(err).splitlines()[0] if str(err) else ""
        where = f"with the weights {path}" if path is not None else "(no dinov2_weights given: download)"
        raise DINOv2WeightsError(f"could not load DINOv2 ViT-L/14 {where}: {type(err).__name__}: {first}; "
                                 f"{_OFFLINE_HINT}") from err
    return model.eval().requires_grad_(False)


class DINOv2Features(nn.Module):
    """The 1024-d DINOv2 ViT-L/14 features of uint8 (N, 1 or 3, H, W) images, as float64 (grey repeated to RGB)."""

    feature_name = "dinov2"
    num_features = 1024

    def __init__(self, weights_path: str | os.PathLike | None = None, model: nn.Module | None = None) -> None:
        """
        Args:
            weights_path: local `DINOV2_FILE`; None downloads it through torch.hub (fails offline, one line).
            model: a network of the same interface instead ((N, 3, 224, 224) normalised images -> (N, d)); then
                `num_features` is given by its output.
        """
        super().__init__()
        self.net = load_dinov2(weights_path) if model is None else model
        if model is not None:
            self.num_features = int(getattr(model, "num_features", getattr(model, "embed_dim", self.num_features)))

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] not in (1, 3):
            raise ValueError(f"expected uint8 images (N, 1 or 3, H, W), got {x.dtype} {tuple(x.shape)}")
        if len(x) == 0:
            return torch.zeros(0, self.num_features, dtype=torch.float64, device=x.device)
        x = F.interpolate(x.expand(-1, 3, -1, -1).to(torch.float32), size=(224, 224), mode="bicubic", antialias=True)
        mean, std = (torch.tensor(v, device=x.device).reshape(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
        return self.net((x / 255 - mean) / std).to(torch.float64)
