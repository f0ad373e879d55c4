"""The weight eta of evodiff_consistent on the digits models: fd_pixels per fixed weight and the per-sample one.

Same generation and score as `digits_nfe.py` (through `sample.py`'s code: `evodiff_pl.sampling.build`, seeds
0..N-1, one per digit, `fd_pixels` against the 1,797 digits); only the solver option `eta` varies:
None (per sample and channel, eq. (5) of docs/evodiff_consistent.md), 0, 1/6 (UniC-2's weight in the limit of
small uniform steps), 1/2 and 1 (= dpmpp_2m); UniPC-2 (the `unipc` defaults) for scale.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/evodiff_consistent_digits.py \
        --run benchmarks/results/digits_640k_ema.ckpt benchmarks/results/digits_1920k_ema.ckpt \
        > benchmarks/results/evodiff_consistent_digits.log
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from evodiff_pl import sampling
from evodiff_pl.sampling.generate import generate

ETAS = {"per-sample (None)": None, "eta=0": 0.0, "eta=1/6": 1 / 6, "eta=1/2": 0.5, "eta=1 (dpmpp_2m)": 1.0}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", type=Path, nargs="+", required=True, help="checkpoints (.ckpt)")
    p.add_argument("--nfe", default="5,10")
    p.add_argument("--samples", type=int, default=1797)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"{'checkpoint':<28} {'schedule':<24} {'NFE':>3} " + " ".join(f"{k:>17}" for k in [*ETAS, "unipc"]))
    for run in args.run:
        # the learned grid: the dedicated pass beside the checkpoint (digits_nfe.py's rescaled_entropic_pass)
        estimated = sampling.estimated_schedule_path(run)
        for schedule, schedule_file in (("rescaled_entropic", str(estimated)), ("logsnr", None)):
            cfg = sampling.SampleConfig(ckpt=str(run), solver="evodiff_consistent,unipc", schedule=schedule,
                                        nfe=args.nfe, schedule_file=schedule_file, score="fd_pixels", format="none",
                                        seeds=f"0-{args.samples - 1}", batch=args.samples, progress=False)
            job = sampling.build(cfg)
            meta = job.loaded.meta
            for nfe in sorted({plan.nfe for plan in job.plans}):
                t0, cells = time.perf_counter(), []
                for plan in (q for q in job.plans if q.nfe == nfe):
                    for eta in ETAS.values() if plan.solver == "evodiff_consistent" else [None]:
                        options = {"eta": eta} if plan.solver == "evodiff_consistent" else {}
                        job.score.reset()
                        x = generate(job.loaded.denoiser, job.seeds, tuple(meta["sample_shape"]), solver=plan.solver,
                                     sigmas=plan.sigmas, seed=0, batch_size=cfg.batch,
                                     num_classes=meta["num_classes"], device=job.device, **options)
                        job.score.update(x)
                        cells.append(job.score.compute())
                label = "rescaled_entropic_pass" if schedule_file else schedule
                print(f"{run.name:<28} {label:<24} {nfe:>3} " + " ".join(f"{c:17.1f}" for c in cells)
                      + f"  ({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
