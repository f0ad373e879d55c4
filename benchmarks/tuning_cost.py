"""Cost of tuning a `tuned` spec's grid during validation against one validation evaluation, on a digits model.

One validation evaluation = the default run's specs before it tracked a tuned grid (--specs), 1,797 samples
each, pixel FD, as `SampleQualityCallback.evaluate` does. Tuning = `tune_grids` for the given tuned specs with the
callback's defaults (`SampleQualityCallback` tune_*: 128 noises, 12 solver runs, 40-step reference), cold and
warm-started. Reports wall seconds and denoiser sample-calls (samples x NFE; load-independent) of each.

    OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/tuning_cost.py | tee benchmarks/results/tuning_cost.log
"""

from __future__ import annotations

import argparse
import inspect
import time

import torch

from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.evaluation.metrics import FrechetScore
from evodiff_pl.io.denoiser import load_denoiser
from evodiff_pl.sampling.generate import EvalSpec, generate
from evodiff_pl.sampling.job import checkpoint_data
from evodiff_pl.sampling.grid_tuning import learned_start, tune_grids, tuning_noise


class Counted:
    """D(x, sigma) counting sample-calls."""

    def __init__(self, denoiser) -> None:
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, *labels):
        self.calls += len(x)
        return self.denoiser(x, sigma, *labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="benchmarks/results/digits_640k_ema.ckpt")
    p.add_argument("--specs", nargs="+", default=["evodiff_consistent/rescaled_entropic/10", "dpmpp_2m/logsnr/10",
                                                  "evodiff/logsnr/10"])
    p.add_argument("--tuned", nargs="+", default=["unipc/tuned/5"])
    args = p.parse_args()
    torch.set_num_threads(1)
    loaded = load_denoiser(args.ckpt)
    meta, D = loaded.meta, Counted(loaded.denoiser)
    shape, lo, hi = tuple(meta["sample_shape"]), meta["sigma_min"], meta["sigma_max"]
    specs = [EvalSpec.parse(s) for s in args.specs]
    score = FrechetScore("pixels", num_samples=1797, shape=shape)
    score.prepare_real(checkpoint_data(loaded))
    t0 = time.perf_counter()
    for spec in specs:
        score.reset()
        score.update(generate(D, torch.arange(1797), shape, solver=spec.solver, seed=0, batch_size=256,
                              sigmas=spec.sigmas(lo, hi, loaded.schedule)))
        score.compute()
    eval_s, eval_calls = time.perf_counter() - t0, D.calls
    print(f"validation evaluation ({', '.join(s.name for s in specs)}; 1797 samples each): {eval_s:.1f} s, "
          f"{eval_calls} sample-calls", flush=True)
    defaults = {k: v.default for k, v in inspect.signature(SampleQualityCallback).parameters.items()
                if k.startswith("tune_")}
    wanted = [(s.solver, s.nfe) for s in map(EvalSpec.parse, args.tuned)]
    x_T, _ = tuning_noise(defaults["tune_samples"], shape, hi)
    grids = None
    for label in ("cold", "warm"):
        D.calls, t0 = 0, time.perf_counter()
        grids = tune_grids(wanted, D, x_T, learned_start(loaded.schedule, lo, hi), previous=grids,
                           objective=defaults["tune_objective"], max_evals=defaults["tune_evals"],
                           reference_steps=defaults["tune_reference_steps"])
        seconds = time.perf_counter() - t0
        print(f"tuning {', '.join(args.tuned)} ({label}, {defaults}): {seconds:.1f} s, {D.calls} sample-calls: "
              f"{seconds / eval_s:.1%} of the evaluation's time, {D.calls / eval_calls:.1%} of its calls", flush=True)


if __name__ == "__main__":
    main()
