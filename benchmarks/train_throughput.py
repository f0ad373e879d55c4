"""Training throughput: EDMModule under a Lightning Trainer vs a plain PyTorch loop doing the same EDM step.

Both run the default digits U-Net (configs/digits.yaml) on the same global-batch data stream with Adam and
the EDM EMA update; they alternate, `--repeats` times, `--steps` steps each, and the table reports medians
of the per-step wall times (the first `--warmup` steps of every run excluded). The Lightning side also
does what the plain loop does not: per-step seeded noise, the all-reduced non-finite check (one host sync),
the σ-binned tracker update and logging. The tracker update is also timed alone.

    python benchmarks/train_throughput.py [--steps 30] [--repeats 5] [--batch 128]
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
import warnings
from pathlib import Path

import lightning as L
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evodiff_pl.config import EntropicConfig, load_config  # noqa: E402
from evodiff_pl.ema import ema_beta, update_ema  # noqa: E402
from evodiff_pl.training import build_data, network_kwargs  # noqa: E402
from evodiff_pl.module import EDMModule  # noqa: E402
from evodiff_pl.networks import build_network  # noqa: E402
from evodiff_pl.precond import EDMLoss, EDMPrecond  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402


class StepTimer(L.Callback):
    """Wall time between consecutive training-batch starts (includes data fetch and Lightning's loop)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, *args) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, *args) -> None:
        self.starts.append(time.perf_counter())


def plain_loop(net: EDMPrecond, loader, steps: int, batch: int, lr: float) -> list[float]:
    """EDM training_loop.py's step: loss, backward, Adam, EMA; returns per-step times."""
    ema = copy.deepcopy(net).requires_grad_(False)
    opt = torch.optim.Adam(net.parameters(), lr=lr, betas=(0.9, 0.999), eps=1e-8)
    loss_fn = EDMLoss()
    times, it, images = [], iter(loader), 0
    t = time.perf_counter()
    for _ in range(steps):
        x0, _labels = next(it)
        loss = loss_fn(net, x0).loss.mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        update_ema(ema, net, ema_beta(images, batch, 10_000, 0.1))
        images += batch
        now = time.perf_counter()
        times.append(now - t)
        t = now
    return times


def lightning_loop(module: EDMModule, dm, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=module.global_step + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[timer])
    dm.stream_from(module.images_seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=dm)
    return [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    args = parser.parse_args()

    cfg = load_config(overrides=[f"data.batch_size={args.batch}"])
    L.seed_everything(0, verbose=False)
    dm = build_data(cfg)
    kwargs = network_kwargs(cfg.model.network, OmegaConf.to_container(cfg.model.net), dm.shape, dm.num_classes)
    net = EDMPrecond(build_network(cfg.model.network, **kwargs))
    n_params = sum(p.numel() for p in net.parameters())
    module = EDMModule(copy.deepcopy(net), EDMLoss(), sample_shape=dm.shape, num_classes=0, global_batch=args.batch,
                       seed=0, optim=OmegaConf.to_object(cfg.optim), ema=OmegaConf.to_object(cfg.ema),
                       entropic=EntropicConfig(update_every_steps=10**9))
    dm.stream_from(0)
    plain_loader = dm.train_dataloader()

    plain, light = [], []
    for _ in range(args.repeats):
        plain.append(statistics.median(plain_loop(net, plain_loader, args.steps, args.batch, cfg.optim.lr)[args.warmup:]))
        light.append(statistics.median(lightning_loop(module, dm, args.steps)[args.warmup:]))
    t_plain, t_light = statistics.median(plain), statistics.median(light)

    tracker = module.tracker
    sigma = EDMLoss().sample_sigma(args.batch, device="cpu")
    mse, weight = torch.rand(args.batch), EDMLoss().weight(sigma)
    for _ in range(20):
        tracker.update(sigma, mse, weight)
    ts = []
    for _ in range(200):
        t = time.perf_counter()
        tracker.update(sigma, mse, weight)
        ts.append(time.perf_counter() - t)
    t_tracker = statistics.median(ts)

    print(f"digits U-Net ({n_params / 1e3:.0f}k params), batch {args.batch} of {tuple(dm.shape)}, "
          f"{torch.get_num_threads()} threads, {args.repeats} x {args.steps} steps each, medians")
    print(f"| {'path':<34} | {'ms/step':>8} | {'img/s':>8} | {'vs plain':>9} |")
    print(f"|{'-' * 36}|{'-' * 10}|{'-' * 10}|{'-' * 11}|")
    print(f"| {'plain PyTorch loop (EDM step+EMA)':<34} | {t_plain * 1e3:8.2f} | {args.batch / t_plain:8.0f} | {'':>9} |")
    print(f"| {'EDMModule + Lightning Trainer':<34} | {t_light * 1e3:8.2f} | {args.batch / t_light:8.0f} | "
          f"{(t_light / t_plain - 1) * 100:+8.1f}% |")
    print(f"| {'tracker.update alone':<34} | {t_tracker * 1e3:8.3f} | {'':>8} | "
          f"{t_tracker / t_light * 100:7.2f}%* |")
    print("* share of the EDMModule step time (target <= 1%); Lightning overhead target <= 5%")
    print("per-repeat ms/step plain:", " ".join(f"{t * 1e3:.1f}" for t in plain))
    print("per-repeat ms/step module:", " ".join(f"{t * 1e3:.1f}" for t in light))


if __name__ == "__main__":
    main()
