"""Whether a file's weights fit a network, and building a network from recorded arguments without allocating one
that is too large or that the weights do not fit (both checked first on the meta device)."""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from evodiff_pl.io.checkpointing import CheckpointError

SHOWN = 3
"""Keys named per kind of mismatch."""


def fit_problems(target: dict[str, torch.Tensor], source: dict[str, torch.Tensor],
                 network: str = "config") -> list[str]:
    """The first missing, unexpected and differently shaped keys of the weights `source` against the network's
    `target` ones, one phrase per kind; empty when they fit."""
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    shapes = [f"{k} {tuple(source[k].shape)} vs {tuple(v.shape)}" for k, v in target.items()
              if k in source and source[k].shape != v.shape]
    return [f"{what} {', '.join(keys[:SHOWN])}{' ...' if len(keys) > SHOWN else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected),
                               (f"shape (file vs {network})", shapes)) if keys]


def max_parameters() -> float:
    """Largest network recorded arguments may ask for: $EVODIFF_MAX_PARAMETERS, else 20e9."""
    return float(os.environ.get("EVODIFF_MAX_PARAMETERS", 20e9))


def build_checked(backbone: Callable[[], torch.nn.Module], wrap: Callable[[torch.nn.Module], torch.nn.Module],
                  state: dict[str, torch.Tensor], what: str) -> torch.nn.Module:
    """`wrap(backbone())` (a preconditioner around its backbone) holding the weights `state`; CheckpointError (one
    line) before the backbone is allocated when the network has more than `max_parameters()` parameters or `state`
    does not fit it (the backbone is built first on the meta device)."""
    with torch.device("meta"):
        shell = backbone()
    shell = wrap(shell)
    count = sum(p.numel() for p in shell.parameters())
    if count > max_parameters():
        raise CheckpointError(f"{what} with its recorded arguments would have {count:.3g} parameters, more than "
                              f"{max_parameters():.3g} (set EVODIFF_MAX_PARAMETERS to allow it)")
    problems = fit_problems(shell.state_dict(), state, "network")
    if problems:
        raise CheckpointError(f"the weights of {what} do not fit the network of its recorded arguments "
                              f"({'; '.join(problems)})")
    network = wrap(backbone())
    network.load_state_dict(state)
    return network
