"""Power-function EMA and its post-hoc reconstruction (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", §3 and Appendix C).

A power-function EMA with exponent γ averages the weights seen up to time t (in images) with density
p(τ) = (γ+1) τ^γ / t^(γ+1) on [0, t]; its width is quoted as the relative standard deviation σ_rel of that
density. Training tracks a few such profiles (`ema.kind=power`, `ema.stds`) and writes them at a fixed cadence
to `RUN/phema/`; afterwards any other σ_rel is approximated as the linear combination of stored snapshots whose
density is closest in L2 to the wanted one. Command line:

    python -m evodiff_pl.training.phema run.dir=RUN std=0.08 [out=PATH] [images=N] [tol=0.05]

writes a sampling checkpoint (`sample.py ckpt=PATH` reads it) holding the reconstructed weights as `ema.*`.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from evodiff_pl.training.ema import update_ema
from evodiff_pl.utils.fileio import atomic_write
from evodiff_pl.utils.stop import STOP, Stopped, finish, raise_if_stopped, stoppable

SNAPSHOT_DIR = "phema"
"""Folder of the run directory that holds the snapshots."""
MAX_STD = math.sqrt(1 / 12)
"""σ_rel of the flat average (γ = 0); power-function profiles with γ ≥ 0 are narrower."""
_SNAPSHOT = re.compile(r"phema-(\d+)-(\d+\.\d+)\.pt")
RECONSTRUCTION = "the post-hoc EMA reconstruction"


def std_to_gamma(std: float) -> float:
    """The exponent γ ≥ 0 whose profile has relative standard deviation `std` (paper eq. (126))."""
    if not 0 < std < MAX_STD:
        raise ValueError(f"a power-function EMA needs 0 < std < {MAX_STD:.4f} (the flat average), got {std}")
    s = std ** -2
    # eq. (126): γ³ + 7γ² + (16 − σ_rel⁻²)γ + (12 − σ_rel⁻²) = 0, the largest real root
    roots = np.roots([1.0, 7.0, 16.0 - s, 12.0 - s])
    return float(roots[np.abs(roots.imag) < 1e-9].real.max())


def gamma_to_std(gamma: float) -> float:
    """σ_rel = √((γ+1) / ((γ+2)² (γ+3))), the relative standard deviation of the profile (paper eq. (123))."""
    return math.sqrt((gamma + 1) / ((gamma + 2) ** 2 * (gamma + 3)))


def power_beta(gamma: float, images_after: int, batch_images: int) -> float:
    """Per-step decay of a profile for a step of `batch_images` that ends at `images_after` (paper eq. (127)):
    β = (1 − Δt/t)^(γ+1). The first step (t = Δt) gives β = 0: the average starts as the weights."""
    return (1.0 - batch_images / images_after) ** (gamma + 1.0)


def profile_dot(t_a: np.ndarray, g_a: np.ndarray, t_b: np.ndarray, g_b: np.ndarray) -> np.ndarray:
    """∫ p_a p_b dτ of two power-function densities ending at t_a, t_b with exponents g_a, g_b (broadcast)."""
    # ∫_0^min(t_a,t_b) (g_a+1)(g_b+1) τ^(g_a+g_b) / (t_a^(g_a+1) t_b^(g_b+1)) dτ, closed form (paper eq. (151))
    lo = np.minimum(t_a, t_b)
    log_val = ((g_a + g_b + 1) * np.log(lo) - (g_a + 1) * np.log(t_a) - (g_b + 1) * np.log(t_b))
    return (g_a + 1) * (g_b + 1) / (g_a + g_b + 1) * np.exp(log_val)


@dataclass(frozen=True)
class Reconstruction:
    """Weights `coefficients[i]` of stored profile i (ending at `times[i]` with σ_rel `stds[i]`) that best
    approximate the profile with σ_rel `std` ending at `time`; `residual` = ‖Σ c_i p_i − p‖ / ‖p‖
    (L2 in τ)."""

    coefficients: np.ndarray
    times: np.ndarray
    stds: np.ndarray
    std: float
    time: float
    residual: float


def solve_coefficients(times: Sequence[float], stds: Sequence[float], time: float, std: float) -> Reconstruction:
    """Least-squares coefficients of stored profiles (times, stds) for the profile (time, std) (paper Alg. 3).

    Solves the normal equations A c = b with A_ij = <p_i, p_j>, b_i = <p_i, p>, then rescales c to sum to one
    (the reconstruction of constant weights is exact), as the paper does."""
    t = np.asarray(times, dtype=np.float64)
    s = np.asarray(stds, dtype=np.float64)
    if t.shape != s.shape or t.ndim != 1 or t.size == 0:
        raise ValueError(f"need matching 1-d times and stds, got {t.shape} and {s.shape}")
    g = np.array([std_to_gamma(float(v)) for v in s])
    g_out = std_to_gamma(std)
    a = profile_dot(t[:, None], g[:, None], t[None, :], g[None, :])
    b = profile_dot(t, g, np.float64(time), np.float64(g_out))
    c = np.linalg.lstsq(a, b, rcond=None)[0]
    c = c / c.sum()
    # ‖Σ c_i p_i − p‖² = cᵀAc − 2cᵀb + <p, p>
    norm2 = profile_dot(np.float64(time), np.float64(g_out), np.float64(time), np.float64(g_out))
    err2 = max(float(c @ a @ c - 2 * c @ b + norm2), 0.0)
    return Reconstruction(c, t, s, float(std), float(time), math.sqrt(err2 / norm2))


class PowerEMA(nn.Module):
    """The power-function EMA profiles of a network, one frozen copy per σ_rel in `stds` (`profiles[i]`)."""

    def __init__(self, net: nn.Module, stds: Sequence[float]) -> None:
        super().__init__()
        if not stds:
            raise ValueError("ema.stds must name at least one relative standard deviation")
        self.stds = [float(s) for s in stds]
        self.gammas = [std_to_gamma(s) for s in self.stds]
        self.profiles = nn.ModuleList(_frozen_copy(net) for _ in self.stds)

    def betas(self, images_after: int, batch_images: int) -> list[float]:
        """The decay of every profile for a step of `batch_images` ending at `images_after` images."""
        return [power_beta(g, images_after, batch_images) for g in self.gammas]

    def update(self, net: nn.Module, images_after: int, batch_images: int, keep: Tensor | None = None) -> None:
        """One step of every profile towards `net` for the batch ending at `images_after` images (`keep`: as
        `update_ema`)."""
        for profile, beta in zip(self.profiles, self.betas(images_after, batch_images)):
            update_ema(profile, net, beta, keep=keep)

    def snapshot(self, run_dir: str | Path, images_seen: int, batch_images: int, every: int | None,
                 meta: dict[str, Any]) -> None:
        """Save every profile when the last batch took `images_seen` past a multiple of `every` images (none if
        `every` is 0 or None)."""
        if not every or images_seen // every == (images_seen - batch_images) // every:
            return
        for std, profile in zip(self.stds, self.profiles):
            save_snapshot(run_dir, images_seen, std, profile, meta)


def _frozen_copy(net: nn.Module) -> nn.Module:
    return copy.deepcopy(net).requires_grad_(False).eval()


def snapshot_path(run_dir: str | Path, images: int, std: float) -> Path:
    """RUN/phema/phema-<images, 12 digits>-<std, 3 decimals>.pt."""
    return Path(run_dir) / SNAPSHOT_DIR / f"phema-{int(images):012d}-{std:.3f}.pt"


def save_snapshot(run_dir: str | Path, images: int, std: float, net: nn.Module, meta: dict[str, Any]) -> Path:
    """Write one profile's weights (float32, CPU) with the run's `meta` atomically; returns the path."""
    path = snapshot_path(run_dir, images, std)
    state = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).clone()
             for k, v in net.state_dict().items()}
    blob = {"images": int(images), "std": float(std), "state_dict": state, "meta": meta}
    atomic_write(path, lambda f: torch.save(blob, f))
    return path


def list_snapshots(run_dir: str | Path) -> list[tuple[int, float, Path]]:
    """(images, std, path) of every snapshot in RUN/phema, sorted by images then std."""
    folder = Path(run_dir) / SNAPSHOT_DIR
    found = []
    for path in folder.glob("phema-*.pt") if folder.is_dir() else ():
        m = _SNAPSHOT.fullmatch(path.name)
        if m:
            found.append((int(m.group(1)), float(m.group(2)), path))
    return sorted(found, key=lambda r: (r[0], r[1]))


def reconstruct(run_dir: str | Path, std: float, *, images: int | None = None,
                tol: float = 0.05) -> tuple[dict[str, Tensor], dict[str, Any], Reconstruction]:
    """The weights of the σ_rel = `std` profile at `images` (default: the newest snapshot's), from the snapshots
    in RUN/phema. ValueError (one line) when there are none, `images` is not a snapshot time, or the stored
    profiles cannot reproduce the wanted one to relative L2 error `tol` (too narrow or too wide for them). A stop
    signal (`evodiff_pl.utils.stop`, when taken) raises `Stopped` before the next snapshot is read."""
    snaps = list_snapshots(run_dir)
    if not snaps:
        raise ValueError(f"no power-EMA snapshots in {Path(run_dir) / SNAPSHOT_DIR} (train with ema.kind=power "
                         "and ema.snapshot_every_images > 0)")
    times = sorted({r[0] for r in snaps})
    images = times[-1] if images is None else int(images)
    if images not in times:
        raise ValueError(f"images={images} is not a snapshot time in {Path(run_dir) / SNAPSHOT_DIR} "
                         f"(have {times[0]} ... {times[-1]})")
    used = [r for r in snaps if r[0] <= images]
    rec = solve_coefficients([r[0] for r in used], [r[1] for r in used], images, std)
    if rec.residual > tol:
        ok = reconstructable_stds(rec.times, rec.stds, images, tol)
        span = f"[{ok[0]:.3f}, {ok[1]:.3f}]" if ok else "none"
        raise ValueError(f"std={std} cannot be reconstructed from the {len(used)} stored profiles (relative error "
                         f"{rec.residual:.3f} > tol={tol}); reconstructable stds at images={images}: {span}")
    state: dict[str, Tensor] = {}
    meta: dict[str, Any] = {}
    for c, (_, _, path) in stoppable(list(zip(rec.coefficients, used)), RECONSTRUCTION):
        blob = torch.load(path, map_location="cpu", weights_only=True)
        meta = blob["meta"]
        for k, v in blob["state_dict"].items():
            if not v.is_floating_point():
                state[k] = v
            else:
                state[k] = state[k] + float(c) * v.double() if k in state else float(c) * v.double()
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}, meta, rec


def reconstructable_stds(times: Sequence[float], stds: Sequence[float], time: float,
                         tol: float) -> tuple[float, float] | None:
    """The (smallest, largest) σ_rel on a 0.001 grid whose reconstruction at `time` has relative error <= tol."""
    grid = np.arange(0.001, MAX_STD, 0.001)
    good = [v for v in grid if solve_coefficients(times, stds, time, float(v)).residual <= tol]
    return (float(min(good)), float(max(good))) if good else None


_KEYS = {"run.dir": "the train.py run directory (required)", "std": "the wanted sigma_rel, 0 < std < 0.2887 (required)",
         "out": "the checkpoint to write (default RUN/phema/phema-IMAGES-STD.ckpt)",
         "images": "the snapshot time in images (default: the newest)",
         "tol": "largest relative L2 error of the reconstructed profile (default 0.05)"}


def parser() -> argparse.ArgumentParser:
    """The command line of `main`: KEY=VALUE settings, the keys of `_KEYS`."""
    p = argparse.ArgumentParser(prog="python -m evodiff_pl.training.phema",
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                description="Reconstruct a post-hoc power-function EMA of another length from a run's "
                                            "snapshots and write it as a sampling checkpoint (sample.py ckpt=OUT).",
                                epilog="keys:\n" + "\n".join(f"  {k:<9} {v}" for k, v in _KEYS.items()))
    p.add_argument("settings", nargs="*", metavar="KEY=VALUE", help="run.dir=RUN std=S [out=PATH] [images=N] [tol=T]")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m evodiff_pl.training.phema run.dir=RUN std=S [out=PATH] [images=N] [tol=T]` (console script
    `evodiff-phema`); 0 on success, 2 on bad input (one line), 128 + the signal number after SIGUSR1 or SIGTERM
    (nothing written; SIGUSR1 under SLURM requeues the job)."""
    settings = parser().parse_args(argv).settings
    args = dict(a.split("=", 1) for a in settings if "=" in a)
    unknown = sorted(set(args) - set(_KEYS)) + [a for a in settings if "=" not in a]
    missing = [k for k in ("run.dir", "std") if k not in args]
    if unknown or missing:
        problem = f"unknown setting {unknown[0]!r}" if unknown else f"missing {missing[0]}=..."
        print(f"error: {problem}; usage: python -m evodiff_pl.training.phema run.dir=RUN std=S [out=PATH] [images=N] "
              "[tol=T] (--help lists the keys)", file=sys.stderr)
        return 2
    STOP.install()
    try:
        return _write_reconstruction(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except Stopped as stop:
        return finish(stop, 0)
    finally:
        STOP.uninstall()


def _write_reconstruction(args: dict[str, str]) -> int:
    """`main`'s work on its checked settings: reconstruct, then write the sampling checkpoint (unless stopped)."""
    from evodiff_pl.io.checkpointing import CHECKPOINT_KEY, write_checkpoint

    std = float(args["std"])
    images = int(args["images"]) if "images" in args else None
    state, meta, rec = reconstruct(args["run.dir"], std, images=images, tol=float(args.get("tol", 0.05)))
    raise_if_stopped(RECONSTRUCTION)
    out = Path(args.get("out", Path(args["run.dir"]) / SNAPSHOT_DIR / f"phema-{int(rec.time):012d}-{std:.3f}.ckpt"))
    meta = {**meta, "phema": {"std": std, "images": int(rec.time), "residual": rec.residual,
                              "sources": [[int(t), float(s), float(c)] for t, s, c in
                                          zip(rec.times, rec.stds, rec.coefficients)]}}
    write_checkpoint(out, {"state_dict": {f"ema.{k}": v for k, v in state.items()}, CHECKPOINT_KEY: meta})
    print(f"wrote {out}: std={std} at {int(rec.time)} images from {rec.times.size} snapshots "
          f"(relative L2 error of the profile {rec.residual:.2e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
