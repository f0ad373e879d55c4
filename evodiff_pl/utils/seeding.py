"""Seeds derived from key tuples, a counter-based integer hash on tensors, and the process's RNG state as
checkpointable containers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch import Tensor


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing `keys` (SeedSequence), so that nearby key tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]) >> 1  # int first: numpy < 2 has no uint64 >> int


GOLDEN = 0x9E3779B97F4A7C15 - (1 << 64)
"""splitmix64's increment as a signed int64 (torch has no uint64 arithmetic)."""
_MUL1, _MUL2 = 0xBF58476D1CE4E5B9 - (1 << 64), 0x94D049BB133111EB - (1 << 64)


def _shr(z: Tensor, k: int) -> Tensor:
    """Logical right shift of int64 `z` by k bits (torch's >> is arithmetic on int64)."""
    return (z >> k) & ((1 << (64 - k)) - 1)


def splitmix64(x: Tensor) -> Tensor:
    """splitmix64's output function of state `x` + GOLDEN, elementwise on int64 tensors (Steele, Lea & Flood 2014,
    "Fast splittable pseudorandom number generators"), wrapping modulo 2^64: state x + k·GOLDEN for k = 1, 2, ...
    is the generator seeded with x."""
    z = x + GOLDEN
    z = (z ^ _shr(z, 30)) * _MUL1
    z = (z ^ _shr(z, 27)) * _MUL2
    return z ^ _shr(z, 31)


def rng_state() -> dict[str, Any]:
    """torch (CPU and CUDA), NumPy and Python RNG states as tensors and plain containers (weights_only-safe)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "python": random.getstate(),
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore a state of `rng_state`."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    random.setstate(state["python"])
