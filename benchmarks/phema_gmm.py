"""Post-hoc EMA on the mixture: sample quality of EMA lengths reconstructed after training from the power-EMA
snapshots of a configs/gmm_edm2.yaml run (`python -m evodiff_pl.training.phema`), one row per σ_rel.

Each σ_rel is reconstructed at the last snapshot, then sampled from seeds 0..N-1 with one solver/schedule/NFE and
scored by the Fréchet distance of fitted Gaussians to fresh mixture samples (as gmm_nfe.py).

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/phema_gmm.py --run benchmarks/runs/gmm_edm2
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from evodiff_pl.sampling import cli as sampling
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.sampling.generate import EvalSpec, generate
from evodiff_pl.evaluation.metrics import frechet_distance, gaussian_fit
from evodiff_pl.training.phema import main as phema_main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, default=Path("benchmarks/runs/gmm_edm2"))
    p.add_argument("--stds", type=float, nargs="+", default=[0.01, 0.03, 0.05, 0.07, 0.10, 0.15, 0.20])
    p.add_argument("--spec", default="dpmpp_2m/logsnr/20", help="solver/schedule/nfe (a fixed schedule)")
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--fresh", type=int, default=65536)
    args = p.parse_args()
    torch.set_num_threads(1)
    base = load_denoiser(args.run)
    gm = sampling.checkpoint_data(base).mixture
    mu, cov = gaussian_fit(gm.sample(args.fresh, generator=torch.Generator().manual_seed(1)))
    spec = EvalSpec.parse(args.spec)
    sigmas = spec.sigmas(base.meta["sigma_min"], base.meta["sigma_max"])
    print(f"| σ_rel | FD {spec.name} |\n|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for std in args.stds:
            out = Path(tmp) / f"phema_{std}.ckpt"
            if phema_main([f"run.dir={args.run}", f"std={std}", f"out={out}"]):
                print(f"| {std:g} | - (cannot be reconstructed) |")
                continue
            x = generate(load_denoiser(out).denoiser, torch.arange(args.samples), tuple(base.meta["sample_shape"]),
                         solver=spec.solver, sigmas=sigmas, seed=0, batch_size=args.samples)
            print(f"| {std:g} | {frechet_distance(*gaussian_fit(x), mu, cov):.4f} |", flush=True)


if __name__ == "__main__":
    main()
