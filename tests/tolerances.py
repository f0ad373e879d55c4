"""Tolerances for comparisons with recorded float32 outputs, derived from float32 rounding (tests/data/README.md).

A float32 result of a computation whose longest chain of accumulated roundings has n operations differs from
the exact value by about sqrt(n)·u·(the magnitude of the summed terms), u = 2^-24 (probabilistic rounding-error
bound: Higham & Mary 2019, SIAM J. Sci. Comput. 41(5) A2815). Another CPU (other SIMD width, FMA, thread split)
realises other roundings of the same size, so a tolerance of SAFETY times that bound holds on any machine, while
a wrong layer or formula (relative error >= 1e-3) still fails.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import torch

U32 = 2.0**-24  # unit roundoff of IEEE float32
SAFETY = 8.0  # margin over the probabilistic bound (its constant ~1 holds with probability 1 - 2·exp(-λ²/2), λ = 8)


def float32_tolerance(n_ops: int, sides: int = 1) -> float:
    """Bound on max|a − b| / max|b| when `sides` of a and b are float32 evaluations (the others exact or float64)
    of one computation with n_ops accumulated roundings per output."""
    return SAFETY * sides * math.sqrt(n_ops) * U32


def rounding_depth(module: torch.nn.Module, per_layer: int = 8) -> int:
    """n_ops of one forward pass: every weight's fan-in (its dot products) plus `per_layer` elementwise roundings
    (normalisation, activation, gains, skip sums) for each weight tensor."""
    weights = [p for p in module.parameters() if p.ndim >= 2]
    return sum(p[0].numel() + per_layer for p in weights) or 1


def rel_error(a: torch.Tensor | np.ndarray, ref: np.ndarray) -> float:
    """max|a − ref| / max|ref|, in float64."""
    a = a.detach().double().numpy() if isinstance(a, torch.Tensor) else np.asarray(a, dtype=np.float64)
    ref = np.asarray(ref, dtype=np.float64)
    return float(np.abs(a - ref).max() / max(np.abs(ref).max(), 1e-300))


@contextmanager
def _threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def float32_spread(run: Callable[[torch.dtype], dict[str, torch.Tensor]]) -> dict[str, float]:
    """Per output, the largest max|x32 − x64| over float32 runs with 1, 2 and 3 threads (different summation splits):
    a measured sample of this computation's float32 rounding, for outputs (gradients) whose summed terms cancel so
    that their magnitude is unknown in advance. `run(dtype)` returns the named outputs computed in `dtype`."""
    exact = {k: v.detach().double() for k, v in run(torch.float64).items()}
    spread = dict.fromkeys(exact, 0.0)
    for n in (1, 2, 3):
        with _threads(n):
            for k, v in run(torch.float32).items():
                spread[k] = max(spread[k], (v.detach().double() - exact[k]).abs().max().item())
    return spread
