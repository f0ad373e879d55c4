"""EDM's non-leaky geometric augmentation, on the device (Karras et al. 2022, appendix "augmentation
regularization"; docs/method.md §1.5).

With `data.augment = p > 0`, each training image is independently x-flipped (probability ½, as EDM's CIFAR-10
recipe, whatever p), y-flipped (p/2: a fair coin with probability p), isotropically scaled, rotated, anisotropically
scaled and translated (each with probability p). The transform's parameters form a 9-d vector per image that the
network receives as an extra conditioning input (`augment_labels`); at sampling it is zero (None), i.e. "no
augmentation", so the samples follow the un-augmented data. Integer translation and the colour transforms of the
original pipeline are not part of EDM's recipe and not implemented.

`draw_params(n, p, generator)` draws the raw parameters of n images, `augment(images, params)` applies them
(a pure function of its inputs). The training module draws the parameters of the whole global batch from a CPU
generator seeded by (run seed, batch index), like σ and the noise, and each rank transforms its slice; the
reflect padding is sized from the whole batch's parameters (`pad_params`), so 1 and N processes compute the same
images. The resampling follows Karras et al. 2020 ("Training GANs with limited data", its geometric pipeline):
reflect-pad, 2x upsample with the symlet-6 low-pass filter, bilinear sampling of the inverse transform, filtered
2x downsample.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

AUGMENT_DIM = 9
"""Width of the augmentation labels: xflip, yflip, scale, cos θ − 1, sin θ, aniso·cos φ, aniso·sin φ, tx, ty."""
PARAMS = ("xflip", "yflip", "scale", "rotate", "aniso", "aniso_angle", "translate_x", "translate_y")
"""Columns of a parameter tensor (N, 8): flips in {0, 1}; scale and aniso as log2 factors in units of their
standard deviation; rotation θ and the anisotropy axis φ in radians; translation in units of its standard
deviation."""
XFLIP_MULTIPLIER = 1e8
"""EDM's train.py sets x-flip's probability multiplier to 1e8: with any p > 0 a flip happens with probability ½."""
SCALE_STD = 0.2
"""Log2 standard deviation of the isotropic scaling."""
ANISO_STD = 0.2
"""Log2 standard deviation of the anisotropic scaling."""
ANISO_ROTATE_PROB = 0.5
"""Probability that the anisotropic scaling acts along a random axis φ (else the image axes)."""
TRANSLATE_STD = 0.125
"""Standard deviation of the translation, relative to the image size."""
SYM6 = (0.015404109327027373, 0.0034907120842174702, -0.11799011114819057, -0.048311742585633,
        0.4910559419267466, 0.787641141030194, 0.3379294217276218, -0.07263752278646252,
        -0.021060292512300564, 0.04472490177066578, 0.0017677118642428036, -0.007800708325034148)
"""Daubechies' symlet-6 low-pass decomposition filter: the anti-aliasing filter of the resampling."""


def draw_params(n: int, p: float, generator: torch.Generator | None = None) -> Tensor:
    """Raw parameters (n, 8) (`PARAMS`) of n images, float32 on the generator's device; p = 0 gives all zeros."""
    if not 0 <= p <= 1:
        raise ValueError(f"augmentation probability must be in [0, 1], got {p}")
    kw = dict(generator=generator, device=generator.device if generator is not None else None)
    gate = torch.rand((n, 7), **kw)
    bits = torch.randint(2, (n, 2), **kw).to(torch.float32)
    normal = torch.randn((n, 4), **kw)
    angle = (torch.rand((n, 2), **kw) * 2 - 1) * math.pi
    on = gate < torch.tensor([XFLIP_MULTIPLIER * p, p, p, p, p, ANISO_ROTATE_PROB, p], device=gate.device)
    on[:, 5] &= on[:, 4]  # an axis only for an anisotropic scaling (edm draws it anyway; without one it is moot)
    values = torch.cat([bits, normal[:, :1], angle[:, :1], normal[:, 1:2], angle[:, 1:], normal[:, 2:]], dim=1)
    return values * on[:, [0, 1, 2, 3, 4, 5, 6, 6]]


def augment_labels(params: Tensor) -> Tensor:
    """The network's 9-d conditioning vector (N, 9) of raw parameters (N, 8), float32; zero = no augmentation."""
    xflip, yflip, scale, theta, aniso, phi, tx, ty = params.to(torch.float32).unbind(1)
    return torch.stack([xflip, yflip, scale, theta.cos() - 1, theta.sin(), aniso * phi.cos(), aniso * phi.sin(),
                        tx, ty], dim=1)


def _matrices(entries: list[list[Tensor | float]], like: Tensor) -> Tensor:
    """(N, 3, 3) affine matrices [[a, b, c], [d, e, f], [0, 0, 1]] from per-sample (N,) tensors or numbers."""
    n = like.shape[0]
    rows = entries + [[0.0, 0.0, 1.0]]
    flat = [e if isinstance(e, Tensor) else torch.full((n,), float(e), dtype=like.dtype, device=like.device)
            for row in rows for e in row]
    return torch.stack(flat, dim=1).reshape(n, 3, 3)


def _scale(sx: Tensor | float, sy: Tensor | float, like: Tensor) -> Tensor:
    return _matrices([[sx, 0.0, 0.0], [0.0, sy, 0.0]], like)


def _rotate(theta: Tensor, like: Tensor) -> Tensor:
    return _matrices([[theta.cos(), (-theta).sin(), 0.0], [theta.sin(), theta.cos(), 0.0]], like)


def _translate(tx: Tensor | float, ty: Tensor | float, like: Tensor) -> Tensor:
    return _matrices([[1.0, 0.0, tx], [0.0, 1.0, ty]], like)


def inverse_transforms(params: Tensor, height: int, width: int) -> Tensor:
    """(N, 3, 3) float32 maps from output to input pixel coordinates (x right, y down, origin at the centre)."""
    p = params.to(torch.float32)
    _, _, scale, theta, aniso, phi, tx, ty = p.unbind(1)
    s = (scale * SCALE_STD).exp2()
    a = (aniso * ANISO_STD).exp2()
    # the forward transform is translate ∘ aniso ∘ rotate ∘ scale; its inverse is composed in the reverse order
    g = _scale(1 / s, 1 / s, p)
    g = g @ _rotate(theta, p)
    g = g @ _rotate(-phi, p) @ _scale(1 / a, a, p) @ _rotate(phi, p)
    return g @ _translate(-(tx * (width * TRANSLATE_STD)), -(ty * (height * TRANSLATE_STD)), p)


def _margins(g: Tensor, height: int, width: int, slack: int) -> list[int]:
    """Reflect padding [left, top, right, bottom] that holds every sampled point of the batch plus `slack` pixels
    for the filters, at most the image size minus one."""
    cx, cy = (width - 1) / 2, (height - 1) / 2
    corners = torch.tensor([[-cx, -cy, 1], [cx, -cy, 1], [cx, cy, 1], [-cx, cy, 1]], dtype=g.dtype, device=g.device)
    xy = (g @ corners.t())[:, :2, :].permute(1, 0, 2).flatten(1)  # (2, N * 4): where the output corners come from
    reach = torch.cat([-xy, xy]).amax(dim=1)  # furthest left, top, right, bottom
    extra = torch.tensor([slack - cx, slack - cy] * 2, dtype=g.dtype, device=g.device)
    limit = torch.tensor([width - 1, height - 1] * 2, dtype=g.dtype, device=g.device)
    return (reach + extra).clamp(min=0).minimum(limit).ceil().to(torch.int64).tolist()


def _upsample2x(x: Tensor, taps: Tensor) -> Tensor:
    """2x zero-insertion upsampling of the last two axes, each followed by the (reversed) low-pass filter."""
    n, c, h, w = x.shape
    k = taps.flip(0).reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)
    pad = (len(taps) + 1) // 2
    x = torch.stack([x, torch.zeros_like(x)], dim=4).reshape(n, c, h, 2 * w)[..., :-1]
    x = F.conv2d(x, k, groups=c, padding=(0, pad))
    x = torch.stack([x, torch.zeros_like(x)], dim=3).reshape(n, c, 2 * h, x.shape[3])[:, :, :-1]
    return F.conv2d(x, k.transpose(2, 3), groups=c, padding=(pad, 0))


def _downsample2x(x: Tensor, taps: Tensor, crop: int) -> Tensor:
    """Low-pass filter and keep every second sample of the last two axes, dropping `crop` samples at each end."""
    c = x.shape[1]
    k = taps.reshape(1, 1, 1, -1).repeat(c, 1, 1, 1)
    pad = (len(taps) - 1) // 2
    x = F.conv2d(x, k, groups=c, stride=(1, 2), padding=(0, pad))[..., crop:-crop]
    return F.conv2d(x, k.transpose(2, 3), groups=c, stride=(2, 1), padding=(pad, 0))[:, :, crop:-crop]


def _to_device(t: Tensor, device: torch.device) -> Tensor:
    """A small CPU tensor on `device`; to a GPU through pinned memory without waiting for the device's queue."""
    if device.type == "cuda" and t.device.type == "cpu":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def augment(images: Tensor, params: Tensor, pad_params: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Images (N, C, H, W) transformed by raw parameters (N, 8) (`draw_params`), and their labels (N, 9) in the
    images' dtype.

    `pad_params`: the parameters whose transforms size the reflect padding (default `params`); pass the whole
    global batch's so that every rank pads alike. Runs in the images' float dtype with autocast off; the
    parameters may live on the CPU (the padding is then computed without a device synchronisation).
    """
    if images.ndim != 4:
        raise ValueError(f"augmentation needs images (N, C, H, W), got shape {tuple(images.shape)}")
    if params.shape != (images.shape[0], len(PARAMS)):
        raise ValueError(f"params must have shape ({images.shape[0]}, {len(PARAMS)}), got {tuple(params.shape)}")
    n, c, h, w = images.shape
    with torch.autocast(images.device.type, enabled=False):
        flips = _to_device(params[:, :2], images.device).reshape(n, 2, 1, 1, 1) == 1
        x = torch.where(flips[:, 0], images.flip(3), images)
        x = torch.where(flips[:, 1], x.flip(2), x)

        taps = torch.tensor(SYM6, dtype=x.dtype, device=x.device)
        crop = len(SYM6) // 4
        g = inverse_transforms(params, h, w)
        left, top, right, bottom = _margins(inverse_transforms(pad_params, h, w) if pad_params is not None else g,
                                            h, w, slack=2 * crop)
        x = F.pad(x, [left, right, top, bottom], mode="reflect")
        g = _translate((left - right) / 2, (top - bottom) / 2, g) @ g  # the padded image's centre is offset
        x = _upsample2x(x, taps)
        g = _scale(2.0, 2.0, g) @ g @ _scale(0.5, 0.5, g)  # pixel coordinates of the 2x grids
        g = _translate(-0.5, -0.5, g) @ g @ _translate(0.5, 0.5, g)
        out_h, out_w = (h + 2 * crop) * 2, (w + 2 * crop) * 2  # the 2x output with room for the filter's crop
        # to affine_grid's normalised coordinates ([-1, 1] over each image, align_corners=False)
        g = _scale(2 / x.shape[3], 2 / x.shape[2], g) @ g @ _scale(out_w / 2, out_h / 2, g)
        grid = F.affine_grid(_to_device(g[:, :2, :], x.device).to(x.dtype), [n, c, out_h, out_w], align_corners=False)
        x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        x = _downsample2x(x, taps, crop)
    return x, _to_device(augment_labels(params), images.device).to(images.dtype)
