"""How far the official EVODiff's own σ grid is from ours, and what that does to the endpoint (exact mixture).

The official `EVODiff_edm.get_time_steps` (github.com/ShiguiLi/EVODiff, `NoiseScheduleEDM`) builds its grid with
torch's default float32: log-SNR as linspace(-ln 80, -ln 0.002) in float32, then exp in float32; Karras (ρ = 7)
in numpy float64, then -ln through a float32 tensor and exp in float32. Only this arithmetic is restated here.
Our solvers equal the official code to 1e-14 on any given grid (tests/test_solvers.py feeds both the same stored
float64 levels), so the endpoint of `evodiff` on the float32 grid stands for the official code's own output.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_official_grid.py > benchmarks/results/evodiff_official_grid.log
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from evodiff_pl.schedules import get_sigmas
from evodiff_pl.solvers import solve
from evodiff_pl.toy import GaussianMixture

REFERENCE = Path(__file__).resolve().parent.parent / "tests" / "data" / "gmm_solvers_logsnr_nfe10.npz"


def official_grid(kind: str, n: int, smin: float = 0.002, smax: float = 80.0) -> torch.Tensor:
    """The σ levels `get_time_steps` returns for skip_type logSNR / edm, as float64."""
    if kind == "logsnr":
        lam = torch.linspace((-torch.log(torch.tensor(smax))).item(), (-torch.log(torch.tensor(smin))).item(), n + 1)
    else:
        ramp = np.linspace(0, 1, n + 1)
        lo, hi = smin ** (1 / 7), smax ** (1 / 7)
        lam = torch.tensor(-np.log((hi + ramp * (lo - hi)) ** 7), dtype=torch.float32)
    return torch.exp(-lam).to(torch.float64)


def main() -> None:
    torch.set_num_threads(1)
    with np.load(REFERENCE) as f:
        gm = GaussianMixture(*(torch.tensor(f[k]) for k in ("gmm_weights", "gmm_means", "gmm_vars")))
        x_T = torch.tensor(f["x_T"])
    print(f"{len(x_T)} samples; relative differences, official float32 grid vs our float64 grid")
    for kind in ("logsnr", "karras"):
        for n in (5, 10, 25, 50, 100, 200):
            ours, official = get_sigmas(kind, n), official_grid(kind, n)
            ends = {s: solve(s, gm, x_T, official) - solve(s, gm, x_T, ours) for s in ("evodiff", "dpmpp_2m")}
            ref = solve("evodiff", gm, x_T, ours).norm()
            print(f"{kind:7s} N={n:4d}: grid max {((official - ours).abs() / ours).max().item():.1e}; endpoint "
                  + ", ".join(f"{s} {(e.norm() / ref).item():.1e}" for s, e in ends.items()), flush=True)


if __name__ == "__main__":
    main()
