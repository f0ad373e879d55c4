"""Guidance as a denoiser: autoguidance and classifier-free guidance wrap D(x, σ, labels), so every solver uses them.

`guided(net, weight, ...)` returns D = gnet(x) + w·(net(x) − gnet(x)) as NVlabs edm2's generate_images.py
computes it (`ref.lerp(D, w)`), with the guiding network chosen as edm2 does:

- autoguidance: `gnet` a smaller or less trained version of `net` (conditional: it gets the same labels);
- classifier-free guidance with an unconditional `gnet` (it gets no labels);
- classifier-free guidance with the null label: no `gnet`, a conditional `net` trained with label dropout is
  its own guide without labels (our networks map `labels=None` to the all-zero class vector, the label that
  `model.net.label_dropout` trains, `evodiff_pl.networks.unet_blocks.drop_labels`).

w = 1 is no guidance (the network itself is returned); guiding a network by itself changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import Tensor

if TYPE_CHECKING:
    from evodiff_pl.io.checkpointing import LoadedCheckpoint

Denoiser = Callable[..., Tensor]


class GuidedDenoiser:
    """D(x, σ, labels) = ref + w·(net − ref), ref = gnet(x, σ[, labels]); a pure function of its inputs."""

    def __init__(self, net: Denoiser, gnet: Denoiser, weight: float, gnet_labels: bool) -> None:
        self.net, self.gnet, self.weight, self.gnet_labels = net, gnet, float(weight), gnet_labels

    def __call__(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        d = self.net(x, sigma) if labels is None else self.net(x, sigma, labels)
        ref = self.gnet(x, sigma, labels) if self.gnet_labels and labels is not None else self.gnet(x, sigma)
        # Karras et al. 2024, "Guiding a Diffusion Model with a Bad Version of Itself", eq. (2); Ho & Salimans 2022
        return ref.lerp(d.to(ref.dtype), self.weight)


def guided(net: Denoiser, weight: float, num_classes: int, gnet: Denoiser | None = None,
           gnet_classes: int | None = None) -> Denoiser:
    """`net` guided with strength `weight` (1: `net` itself) by `gnet` (None: `net` without labels, i.e. CFG with
    the null label); `num_classes`, `gnet_classes`: the class counts of net and gnet (0: unconditional).

    ValueError: a weight that is not finite, guidance of an unconditional net without a gnet, or a conditional
    gnet whose class count differs from net's."""
    weight = float(weight)
    if weight != weight or abs(weight) == float("inf"):
        raise ValueError(f"guidance={weight} must be a finite number (1: no guidance)")
    if weight == 1:
        return net
    if gnet is None:
        if num_classes == 0:
            raise ValueError(f"guidance={weight:g} on an unconditional network needs a guiding network (gnet=PATH: "
                             "autoguidance); guidance without gnet is classifier-free guidance with the null label "
                             "of a conditional network trained with label dropout")
        return GuidedDenoiser(net, net, weight, gnet_labels=False)
    gnet_classes = num_classes if gnet_classes is None else gnet_classes
    if gnet_classes not in (0, num_classes):
        raise ValueError(f"the guiding network has {gnet_classes} classes, the network {num_classes}: a gnet must be "
                         "unconditional or have the same classes")
    return GuidedDenoiser(net, gnet, weight, gnet_labels=gnet_classes > 0)


def guide_of(gnet: LoadedCheckpoint | None) -> tuple[Denoiser | None, int | None]:
    """The (gnet, gnet_classes) arguments of `guided` for a loaded guiding network, or (None, None)."""
    return (None, None) if gnet is None else (gnet.denoiser, gnet.meta["num_classes"])
