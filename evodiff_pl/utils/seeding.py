"""Seeds derived from key tuples, and the process's RNG state as checkpointable containers."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixing `keys` (SeedSequence), so that nearby key tuples give unrelated streams."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1, dtype=np.uint64)[0]) >> 1  # int first: numpy < 2 has no uint64 >> int


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
