"""Generate and score samples from a train.py checkpoint, sweep solver settings, or estimate a schedule.

    python sample.py ckpt=runs/digits                                  # 64 PNGs, evodiff_consistent/rescaled_entropic/10
    python sample.py ckpt=runs/digits seeds=0-49999 per_folder=1000 format=both batch=512
    python sample.py ckpt=runs/digits score=fd_pixels nfe=5,10,20 solver=evodiff,dpmpp_2m \\
        schedule=karras,logsnr,rescaled_entropic                      # one table of scores
    torchrun --nproc_per_node=8 sample.py ckpt=runs/cifar10 score=fid_inception seeds=0-49999
    python sample.py ckpt=runs/digits estimate_schedule=true           # -> checkpoints/last_schedule_estimated.json
    python sample.py --help                                            # every key with its default

Image j depends only on seed j (the validation callback's sample j with base seed 0).
"""

from evodiff_pl.entry import sample  # takes SIGUSR1 / SIGTERM before the heavy imports (exit 128 + signal)

if __name__ == "__main__":
    raise SystemExit(sample())
