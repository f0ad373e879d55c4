"""Dropout and label dropout whose masks, inside `sample_streams`, are a function of each sample's seed alone.

Inside `sample_streams(seeds)` (the training step enters it with one int64 seed per local sample, derived from
(run seed, batch index, global position): `evodiff_pl.training.streams.dropout_seeds`), element e of sample i at the
k-th random call of the forward is kept iff a splitmix64 hash of (seeds[i], k, e) clears the threshold p. So a
sample's masks do not depend on the other samples of its call, on how a batch is split into rounds
(`data.batch_gpu`) or over processes, and nothing draws from torch's global generators (evaluation, caches and
resumes never shift them). Outside it, both behave as torch's: `F.dropout` and `torch.rand`. p = 0 and eval mode
compute nothing.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F
from torch import Tensor, nn

GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
"""splitmix64's increment as a signed int64 (torch has no uint64 arithmetic)."""
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)


def _xor_shr_(z: Tensor, k: int) -> Tensor:
    """z ^= z >>> k in place on int64 `z`, >>> the logical right shift (torch's >> is arithmetic on int64)."""
    return z.bitwise_xor_((z >> k).bitwise_and_((1 << (64 - k)) - 1))


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64's output function of state `x` + GOLDEN, elementwise on int64 tensors (Steele, Lea & Flood 2014,
    "Fast splittable pseudorandom number generators"), wrapping modulo 2^64: state x + k·GOLDEN for k = 1, 2, ...
    is the generator seeded with x."""
    z = x + GOLDEN
    _xor_shr_(z, 30).mul_(_MUL1)
    _xor_shr_(z, 27).mul_(_MUL2)
    return _xor_shr_(z, 31)


_UNIFORM_BITS = 53
"""A hash's low 53 bits as a uniform integer u in [0, 2^53); an element is kept iff u >= p·2^53."""


class _Streams:
    """The seeds of the samples of the forward in progress (None: torch's generators) and its random calls so far."""

    def __init__(self) -> None:
        self.seeds: Tensor | None = None
        self.calls = 0


_STREAMS = _Streams()


@contextmanager
def sample_streams(seeds: Tensor) -> Iterator[None]:
    """Inside: the dropout masks of a forward on len(seeds) samples drawn from `seeds` (int64, one per sample, on the
    samples' device); the random calls are counted from 0, so enter once per forward."""
    before = _STREAMS.seeds, _STREAMS.calls
    _STREAMS.seeds, _STREAMS.calls = seeds, 0
    try:
        yield
    finally:
        _STREAMS.seeds, _STREAMS.calls = before


def sample_seeds(base: int, positions: Tensor) -> Tensor:
    """int64 seeds of the samples at `positions` (int64) in the stream of `base`:
    splitmix64(base + (position + 1)·GOLDEN)."""
    return splitmix64(base + (positions + 1) * GOLDEN)


def _keep(shape: torch.Size, p: float, device: torch.device) -> Tensor | None:
    """The keep mask (bool, `shape`) of the next random call from the active sample streams; None outside them."""
    seeds = _STREAMS.seeds
    if seeds is None:
        return None
    if shape[0] != seeds.shape[0]:
        raise ValueError(f"a dropout call on {shape[0]} samples inside sample_streams of {seeds.shape[0]} samples")
    offset = (_STREAMS.calls * GOLDEN + (1 << 63)) % (1 << 64) - (1 << 63)  # k·GOLDEN wrapped to int64
    call = splitmix64(seeds.to(device) + offset)  # one stream per (sample, call)
    _STREAMS.calls += 1
    element = torch.arange(1, shape[1:].numel() + 1, device=device).reshape(1, *shape[1:])
    u = splitmix64(call.reshape(-1, *[1] * (len(shape) - 1)) + element * GOLDEN).bitwise_and_((1 << _UNIFORM_BITS) - 1)
    return u >= round(p * 2 ** _UNIFORM_BITS)


def dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Inverted dropout (Srivastava et al. 2014): each element zeroed with probability p, the others scaled by
    1/(1 - p), in training mode; masks from the sample streams when active, else `F.dropout`."""
    if not (training and p):
        return x
    keep = _keep(x.shape, p, x.device)
    if keep is None:
        return F.dropout(x, p, training=True)
    return x * (keep.to(x.dtype) / (1 - p)) if p < 1 else x * 0


def keep_samples(batch: int, p: float, device: torch.device) -> Tensor:
    """Label dropout's per-sample keep mask (bool, (batch, 1)): True with probability 1 - p, from the sample streams
    when active, else `torch.rand`."""
    keep = _keep(torch.Size((batch, 1)), p, device)
    return torch.rand(batch, 1, device=device) >= p if keep is None else keep


class Dropout(nn.Module):
    """`dropout` as a module (nn.Dropout's place in a network)."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability must be in [0, 1], got {p}")
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        return dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"
