"""Solver-tuned grids (`evodiff_pl.tuning`, docs/method.md §2.7) kept per solver x NFE: the schedule `tuned`.

`TunedGrids` holds one grid per (solver, NFE); `get_sigmas("tuned", n, schedule=grids.for_solver(solver))` reads
one. `evodiff_pl.sampling.grid_tuning.tune_grids` makes them: every (solver, NFE) asked for is tuned from its previous grid (warm start) or from a
starting grid (the learned rescaled entropic one), on the fixed starting noises of `tuning_noise` (seeds
TUNE_SEED + j, never a scoring seed), the work dealt over the ranks and the grids gathered, so every rank ends
with the same grids. The validation callback (`evodiff_pl.evaluation.callback`) and `sample.py tune=true` call it;
the run writes them to RUN/schedule_tuned.json (+ plots/schedule_tuned.png) and into its checkpoints,
`sample.py` beside the checkpoint (`tuned_grids_path`).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from matplotlib.figure import Figure
from torch import Tensor

from evodiff_pl.solvers import nfe as solver_nfe
from evodiff_pl.utils.fileio import atomic_write_json

KIND = "tuned"
_FORMAT, _VERSION = "evodiff-pl/tuned-grids", 1


class SolverGrids:
    """One solver's tuned grids as a learned schedule of kind `tuned`, for `get_sigmas("tuned", ...)`."""

    kind = KIND

    def __init__(self, grids: "TunedGrids", solver: str) -> None:
        self.grids, self.solver = grids, solver

    def sigmas(self, n_steps: int, sigma_min: float, sigma_max: float) -> Tensor:
        calls = solver_nfe(self.solver, n_steps)
        grid = self.grids.get(self.solver, calls)
        if grid is None:
            have = ", ".join(self.grids.grids) or "none"
            raise ValueError(f"no tuned grid for {self.solver} at NFE {calls} (tuned: {have}); tune it with "
                             "sample.py tune=true or a .../tuned/... evaluation spec")
        if abs(grid[0].item() / sigma_max - 1) > 1e-9 or abs(grid[-1].item() / sigma_min - 1) > 1e-9:
            raise ValueError(f"the tuned grid of {self.solver} at NFE {calls} spans [{grid[-1].item():g}, "
                             f"{grid[0].item():g}], not [{sigma_min:g}, {sigma_max:g}]")
        return grid.clone()


class TunedGrids:
    """Tuned grids keyed "solver/nfe" (float64, decreasing, both ends the model's), with how they were made."""

    def __init__(self, grids: dict[str, Sequence[float]] | None = None, *, objective: str = "fd",
                 source: dict[str, Any] | None = None) -> None:
        self.grids = {k: torch.as_tensor(v, dtype=torch.float64) for k, v in (grids or {}).items()}
        self.objective, self.source = objective, dict(source or {})
        for key, grid in self.grids.items():
            solver, _, count = key.partition("/")
            if not count.isdigit() or grid.ndim != 1 or grid.numel() < 2 or (grid[1:] >= grid[:-1]).any() \
                    or (grid <= 0).any():
                raise ValueError(f"tuned grid {key!r} must be keyed 'solver/nfe' and strictly decreasing > 0")
            if solver_nfe(solver, grid.numel() - 1) != int(count):
                raise ValueError(f"tuned grid {key!r} has {grid.numel()} levels: not NFE {count} for {solver}")

    def get(self, solver: str, nfe: int) -> Tensor | None:
        """The grid of `solver` at `nfe` (a copy), or None."""
        grid = self.grids.get(f"{solver}/{nfe}")
        return None if grid is None else grid.clone()

    def for_solver(self, solver: str) -> SolverGrids:
        return SolverGrids(self, solver)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; floats round-trip exactly."""
        return {"format": _FORMAT, "version": _VERSION, "objective": self.objective, "source": self.source,
                "grids": {k: v.tolist() for k, v in self.grids.items()}}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TunedGrids":
        """Inverse of `to_dict`; anything else raises ValueError."""
        if not isinstance(d, dict) or d.get("format") != _FORMAT:
            raise ValueError(f"not tuned grids (expected format {_FORMAT!r})")
        if d.get("version") != _VERSION or not isinstance(d.get("grids"), dict):
            raise ValueError(f"unsupported tuned grids version {d.get('version')!r} (this code reads {_VERSION})")
        return cls(d["grids"], objective=d.get("objective", "fd"), source=d.get("source"))

    def save(self, path: str | Path) -> None:
        """Write the grids as a small JSON file, atomically."""
        atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> "TunedGrids":
        """Read a file written by `save`; anything else raises ValueError naming the file."""
        try:
            return cls.from_dict(json.loads(Path(path).read_text()))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


def tuned_grids_path(ckpt: Path, outdir: str | None = None) -> Path:
    """<outdir or the checkpoint's folder>/<checkpoint stem>_schedule_tuned.json (where `schedule=tuned` looks)."""
    name = f"{Path(ckpt).stem}_schedule_tuned.json"
    return Path(outdir) / name if outdir is not None else Path(ckpt).with_name(name)


def plot_tuned(grids: TunedGrids, start: Callable[[str, int], Tensor] | None = None) -> Figure:
    """σ per step index (log axis) of every tuned grid, with its starting grid `start(solver, nfe)` dashed."""
    fig = Figure(figsize=(6, 4.5))
    ax = fig.subplots()
    for k, (key, grid) in enumerate(sorted(grids.grids.items())):
        colour = f"C{k % 10}"
        ax.semilogy(range(grid.numel()), grid, "o-", color=colour, label=f"{key} tuned")
        if start is not None:
            solver, _, count = key.partition("/")
            ax.semilogy(range(grid.numel()), start(solver, int(count)), "x--", color=colour, alpha=0.6,
                        label=f"{key} start")
    ax.set_xlabel("step index i")
    ax.set_ylabel("σ_i")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"tuned grids (objective {grids.objective}) vs their start", fontsize=9)
    fig.tight_layout()
    return fig


def write_tuned(grids: TunedGrids, run_dir: str | Path, start: Callable[[str, int], Tensor] | None = None) -> Path:
    """RUN/schedule_tuned.json (atomic) and RUN/plots/schedule_tuned.png; returns the JSON's path."""
    path = Path(run_dir) / "schedule_tuned.json"
    grids.save(path)
    (path.parent / "plots").mkdir(parents=True, exist_ok=True)
    plot_tuned(grids, start).savefig(path.parent / "plots" / "schedule_tuned.png", dpi=100)
    return path
