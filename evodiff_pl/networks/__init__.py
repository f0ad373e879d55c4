"""Denoiser backbones F(x, c_noise, labels=None) -> Tensor shaped like x, built by name."""

from __future__ import annotations

from typing import Any

from torch import nn

from evodiff_pl.networks.edm2 import EDM2UNet
from evodiff_pl.networks.mlp import MLPDenoiser
from evodiff_pl.networks.dhariwal import DhariwalUNet
from evodiff_pl.networks.songunet import SongUNet

NETWORKS: dict[str, type[nn.Module]] = {"songunet": SongUNet, "dhariwalunet": DhariwalUNet, "mlp": MLPDenoiser,
                                       "edm2unet": EDM2UNet}


def build_network(name: str, **kwargs: Any) -> nn.Module:
    """Instantiate the backbone registered as `name` with the keyword arguments of its constructor."""
    if name not in NETWORKS:
        raise ValueError(f"unknown network {name!r}; valid names: {sorted(NETWORKS)}")
    return NETWORKS[name](**kwargs)


__all__ = ["NETWORKS", "DhariwalUNet", "EDM2UNet", "MLPDenoiser", "SongUNet", "build_network"]
