"""The bias of the learned entropic schedule: the tracker's schedule vs the dedicated pass on the final EMA network.

Trains the digits model (configs/digits.yaml, with dropout) twice, alike except for `entropic.source`: the raw
network's training loss (`train_loss`, dropout on, no EMA) and the EMA network in eval mode on the first
`entropic.eval_fraction` of each batch (`ema_eval`). The EMA pass draws no random numbers, so both runs train the
same weights (checked: the final EMA weights must be equal) and one dedicated pass (`estimate_mmse` on the final
EMA network over the training images, the same as `sample.py estimate_schedule=true`) is the reference for both.
The table is max |Δ ln σ| over the interior levels of the NFE-step grids, tracker vs pass, for both schedule kinds
(the tracker's schedule rebuilt from its final statistics); the row "pass seed 1" is a second dedicated pass with
other noise and images (its distance to the first is the reference's own noise).

    PYTHONPATH=. python benchmarks/schedule_bias.py --out benchmarks/runs/schedule_bias [--dropout 0.1]
        [--images 128000] [--levels 64] [--pairs 1797] [--nfe 5 10 20] [--set KEY=VALUE ...]

A run directory whose checkpoints/last.ckpt has seen --images images is not trained again; the two runs may
also be trained beforehand, e.g. side by side, with the train.py command the script prints.
"""

from __future__ import annotations

import argparse
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evodiff_pl.io.checkpointing import CHECKPOINT_KEY, read_checkpoint  # noqa: E402
from evodiff_pl.io.denoiser import load_denoiser  # noqa: E402
from evodiff_pl.schedules.entropic import KINDS, EntropicSchedule, estimate_mmse  # noqa: E402
from evodiff_pl.schedules.tracker import SigmaBinnedLoss  # noqa: E402
from evodiff_pl.sampling.estimate import training_samples  # noqa: E402
from evodiff_pl.sampling.job import checkpoint_data  # noqa: E402

SOURCES = ("train_loss", "ema_eval")


def train(run: Path, source: str, args: argparse.Namespace) -> None:
    """`train.py --config configs/digits.yaml` with dropout and the tracker source, unless the run has finished
    (a run stopped half-way is resumed)."""
    ckpt = run / "checkpoints" / "last.ckpt"
    if ckpt.is_file() and read_checkpoint(ckpt)[CHECKPOINT_KEY]["images_seen"] >= args.images:
        print(f"{run}: trained already", flush=True)
        return
    overrides = [f"run.dir={run}", f"model.net.dropout={args.dropout}", f"train.total_images={args.images}",
                 f"entropic.source={source}", "logger.kind=csv", "evaluation.enabled=false",
                 "trainer.progress_bar=false", *args.set]
    env = {**os.environ, "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    print("python train.py --config configs/digits.yaml " + " ".join(overrides), flush=True)
    subprocess.run([sys.executable, str(REPO / "train.py"), "--config", str(REPO / "configs" / "digits.yaml"),
                    *overrides], cwd=REPO, env=env, check=True)


def tracker_schedules(ckpt: Path) -> dict[str, EntropicSchedule]:
    """Both kinds of schedule from the final tracker statistics of a checkpoint."""
    meta = read_checkpoint(ckpt)[CHECKPOINT_KEY]
    state = meta["tracker"]
    tracker = SigmaBinnedLoss(state["sigma_min"], state["sigma_max"], n_bins=state["n_bins"],
                              ema_decay=state["ema_decay"], sigma_data=state["sigma_data"])
    tracker.load_state_dict(state)
    dim = math.prod(meta["sample_shape"])
    return {kind: EntropicSchedule.from_loss_stats(tracker, kind=kind, dim=dim) for kind in KINDS}


def pass_schedules(ckpt: Path, args: argparse.Namespace, seed: int) -> dict[str, EntropicSchedule]:
    """Both kinds of schedule from the dedicated pass on the checkpoint's EMA network."""
    loaded = load_denoiser(ckpt)
    meta = loaded.meta
    data = training_samples(checkpoint_data(loaded), labels=bool(meta["num_classes"]))
    sigmas, mmse = estimate_mmse(loaded.denoiser, data, n_levels=args.levels, n_pairs=args.pairs,
                                 sigma_min=meta["sigma_min"], sigma_max=meta["sigma_max"], batch_size=512, seed=seed,
                                 progress=False)
    dim = math.prod(meta["sample_shape"])
    return {kind: EntropicSchedule.from_mmse(sigmas, mmse, kind=kind, dim=dim, sigma_data=meta["sigma_data"])
            for kind in KINDS}


def gap(a: EntropicSchedule, b: EntropicSchedule, n: int) -> float:
    """max |Δ ln σ| over the interior levels of the two n-step grids on [0.002, 80]."""
    return (a.sigmas(n).log() - b.sigmas(n).log())[1:-1].abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "runs" / "schedule_bias")
    parser.add_argument("--dropout", type=float, default=0.1)
    parser.add_argument("--images", type=int, default=128_000)
    parser.add_argument("--levels", type=int, default=64)
    parser.add_argument("--pairs", type=int, default=1797)
    parser.add_argument("--nfe", type=int, nargs="+", default=[5, 10, 20])
    parser.add_argument("--set", nargs="*", default=[], help="more train.py overrides for both runs")
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    runs = {source: args.out / source for source in SOURCES}
    for source, run in runs.items():
        train(run, source, args)
    ckpts = {source: run / "checkpoints" / "last.ckpt" for source, run in runs.items()}
    weights = [read_checkpoint(c)["state_dict"] for c in ckpts.values()]
    differ = max((weights[0][k].double() - weights[1][k].double()).abs().max().item() for k in weights[0])
    print(f"max |weight difference| between the two runs (raw and EMA): {differ:.3g}", flush=True)
    if differ != 0:
        print("WARNING: the runs trained different weights; each is compared with its own dedicated pass", flush=True)

    reference = {source: pass_schedules(ckpts[source], args, seed=0) for source in (SOURCES if differ else SOURCES[:1])}
    second = pass_schedules(ckpts[SOURCES[0]], args, seed=1)
    header = " | ".join(f"NFE {n}" for n in args.nfe)
    print(f"\ndigits, dropout {args.dropout}, {args.images} images {' '.join(args.set)}; dedicated pass {args.levels} "
          f"levels x {args.pairs} pairs on the final EMA network; max |Δ ln σ| over interior levels vs the pass "
          "(seed 0)\n")
    print(f"| tracker source | kind | {header} |")
    print("|---|---|" + "---|" * len(args.nfe))
    for kind in KINDS:
        for source in SOURCES:
            ref = reference.get(source, reference[SOURCES[0]])[kind]
            learned = tracker_schedules(ckpts[source])[kind]
            print(f"| {source} | {kind} | " + " | ".join(f"{gap(learned, ref, n):.3f}" for n in args.nfe) + " |")
        ref = reference[SOURCES[0]][kind]
        print(f"| pass seed 1 (noise floor) | {kind} | " + " | ".join(f"{gap(second[kind], ref, n):.3f}"
                                                                   for n in args.nfe) + " |")


if __name__ == "__main__":
    main()
