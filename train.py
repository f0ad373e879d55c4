"""Train an EDM diffusion model and learn its entropic-time schedule.

    python train.py                                    # configs/digits.yaml, a few minutes on a CPU
    python train.py --config configs/cifar10.yaml trainer.devices=8 data.batch_size=512

Rerunning the same command resumes from the newest checkpoint in run.dir.
"""

from evodiff_pl.entry import train  # takes SIGUSR1 / SIGTERM before the heavy imports (exit 128 + signal)

if __name__ == "__main__":
    raise SystemExit(train())
