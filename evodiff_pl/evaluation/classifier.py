"""A small CNN classifier of scikit-learn's 8x8 digits whose penultimate features are a second feature space
for Fréchet distances on digits (`FrechetScore(feature=DigitsFeatures(...))`), beside raw pixels.

Architecture (`DigitsCNN`, 1 x 8 x 8 input scaled to [-1, 1]): conv3x3(1->32) ReLU, conv3x3(32->64) ReLU,
maxpool 2 (-> 4x4), conv3x3(64->64) ReLU, flatten (1024), linear(1024->128) ReLU [the 128-d features],
linear(128->10). About 0.19M parameters.

Training split: a fixed permutation of the 1,797 digits (seed 0); the first 1,347 (75%) train, the last 450
test. Adam lr 1e-3, batch 64, 40 epochs, random shifts by up to one pixel as augmentation; the test
accuracy is stored with the weights (`train_digits_classifier` returns it, `benchmarks/digits_nfe.py` prints
and records it). The reference statistics of a Fréchet score use all 1,797 digits, so the classifier has
seen 75% of the reference images: it is a feature extractor, not an independent judge.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import Tensor, nn

from evodiff_pl.utils.fileio import atomic_write

NUM_TRAIN = 1347
"""Digits in the training split (the rest, 450, are the test split)."""


class DigitsCNN(nn.Module):
    """conv32-conv64-pool-conv64-fc128-fc10 on 1 x 8 x 8 digits in [-1, 1]; `features` is the 128-d layer."""

    def __init__(self, width: int = 32, num_features: int = 128, num_classes: int = 10) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.Flatten(),
            nn.Linear(2 * width * 16, num_features), nn.ReLU(),
        )
        self.head = nn.Linear(num_features, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))


class DigitsFeatures(nn.Module):
    """Penultimate (128-d) features of a trained `DigitsCNN` for uint8 digit images (N, 1, 8, 8), as float64."""

    feature_name = "digits_cnn"

    def __init__(self, net: DigitsCNN) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.num_features = net.head.in_features

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype != torch.uint8 or tuple(x.shape[1:]) != (1, 8, 8):
            raise ValueError(f"expected uint8 digits (N, 1, 8, 8), got {x.dtype} {tuple(x.shape)}")
        # uint8 0..255 back to [-1, 1], the training scale (evodiff_pl.utils.images.to_uint8 inverted)
        return self.net.features(x.float() / 127.5 - 1).to(torch.float64)


def digits_split(seed: int = 0) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(x_train, y_train, x_test, y_test): float32 (N, 1, 8, 8) in [-1, 1], int64 labels; fixed permutation."""
    d = load_digits()
    x = torch.from_numpy(d.images / 16 * 2 - 1).to(torch.float32)[:, None]
    y = torch.from_numpy(d.target).to(torch.int64)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = order[:NUM_TRAIN], order[NUM_TRAIN:]
    return x[tr], y[tr], x[te], y[te]


def _shift(x: Tensor, g: torch.Generator) -> Tensor:
    """Each image rolled by up to one pixel in each direction, with the background (-1) padded in."""
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)
    dy, dx = torch.randint(0, 3, (2, len(x)), generator=g)
    rows = (torch.arange(8)[None, :] + dy[:, None])[:, :, None].expand(-1, 8, 8)
    cols = (torch.arange(8)[None, :] + dx[:, None])[:, None, :].expand(-1, 8, 8)
    idx = torch.arange(len(x))[:, None, None]
    return padded[:, 0][idx, rows, cols][:, None]


def accuracy(net: DigitsCNN, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((net.eval()(x).argmax(1) == y).float().mean())


def train_digits_classifier(seed: int = 0, epochs: int = 40, batch_size: int = 64) -> tuple[DigitsCNN, float]:
    """Train `DigitsCNN` on the training split; returns (net in eval mode, test accuracy)."""
    torch.manual_seed(seed)
    x_tr, y_tr, x_te, y_te = digits_split(seed)
    net = DigitsCNN()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(seed + 1)
    for _ in range(epochs):
        net.train()
        for idx in torch.randperm(len(x_tr), generator=g).split(batch_size):
            loss = F.cross_entropy(net(_shift(x_tr[idx], g)), y_tr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    return net.eval(), accuracy(net, x_te, y_te)


def load_or_train(path: str | Path, seed: int = 0, epochs: int = 40) -> tuple[DigitsFeatures, float]:
    """The feature extractor from `path` (a state dict with its test accuracy), training and saving it if absent."""
    path = Path(path)
    net = DigitsCNN()
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net.load_state_dict(saved["state_dict"])
        acc = float(saved["test_accuracy"])
    else:
        net, acc = train_digits_classifier(seed=seed, epochs=epochs)
        saved = {"state_dict": net.state_dict(), "test_accuracy": acc, "seed": seed, "epochs": epochs}
        atomic_write(path, lambda f: torch.save(saved, f))
    return DigitsFeatures(net), acc
