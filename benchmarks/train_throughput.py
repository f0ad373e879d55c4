"""Training throughput: EDMModule under a Lightning Trainer vs a plain PyTorch loop doing the same EDM step.

Both run the default digits U-Net (configs/digits.yaml) on the same global-batch data stream with Adam and
the EDM EMA update; they alternate, `--repeats` times, `--steps` steps each, and the table reports medians
of the per-step wall times (the first `--warmup` steps of every run excluded). The Lightning side also
does what the plain loop does not: per-step seeded noise, the all-reduced non-finite check (one host sync),
the σ-binned tracker update and logging; there the tracker records the training loss (`entropic.source=train_loss`).
A third run, alternating with them, is the default `entropic.source=ema_eval`: the EMA network's no-grad eval-mode
pass on `entropic.eval_fraction` of each batch; its ratio to the train_loss module is the cost of that pass. The
tracker update is also timed alone, and the EMA pass's share of a plain step (loss, backward, Adam) is measured
on the CIFAR-10 network (configs/cifar10.yaml, random 32x32 images) at a small batch.

    python benchmarks/train_throughput.py [--steps 30] [--repeats 5] [--batch 128] [--cifar-batch 32]
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

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from evodiff_pl.config.schema import EntropicConfig, load_config  # noqa: E402
from evodiff_pl.training.ema import ema_beta, update_ema  # noqa: E402
from evodiff_pl.training.run import build_data, network_kwargs  # noqa: E402
from evodiff_pl.training.module import EDMModule  # noqa: E402
from evodiff_pl.networks import build_network  # noqa: E402
from evodiff_pl.networks.precond import EDMPrecond  # noqa: E402
from evodiff_pl.training.losses import EDMLoss  # noqa: E402
from evodiff_pl.training.datamodule import as_lightning
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


def ema_pass_share(net: EDMPrecond, shape: tuple[int, ...], batch: int, fraction: float, steps: int,
                   warmup: int) -> tuple[float, float]:
    """Median seconds of a plain training step (EDM loss, backward, Adam; dropout on) and of the EMA pass of
    `entropic.source=ema_eval` that follows it (the EMA copy in eval mode, no grad, on the batch's first
    round(fraction * batch) samples with the step's σ and noise), timed alternately on random data."""
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn, g, n = EDMLoss(), torch.Generator().manual_seed(0), max(1, round(fraction * batch))
    step_times, pass_times = [], []
    for i in range(warmup + steps):
        x0, noise = torch.randn(batch, *shape, generator=g), torch.randn(batch, *shape, generator=g)
        sigma = loss_fn.sample_sigma(batch, device="cpu", generator=g)
        t0 = time.perf_counter()
        loss_fn(net, x0, sigma=sigma, noise=noise).loss.mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        t1 = time.perf_counter()
        with torch.no_grad():
            loss_fn(ema, x0[:n], sigma=sigma[:n], noise=noise[:n])
        t2 = time.perf_counter()
        if i >= warmup:
            step_times.append(t1 - t0)
            pass_times.append(t2 - t1)
    return statistics.median(step_times), statistics.median(pass_times)


def lightning_loop(module: EDMModule, dm, steps: int) -> list[float]:
    timer = StepTimer()
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=module.global_step + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, use_distributed_sampler=False,
                        callbacks=[timer])
    dm.stream_from(module.images_seen)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, datamodule=as_lightning(dm))
    return [b - a for a, b in zip(timer.starts[:-1], timer.starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--cifar-batch", type=int, default=32, help="batch of the CIFAR-10 EMA-pass share; 0 skips it")
    parser.add_argument("--cifar-steps", type=int, default=6)
    args = parser.parse_args()

    cfg = load_config(overrides=[f"data.batch_size={args.batch}"])
    L.seed_everything(0, verbose=False)
    dm = build_data(cfg)
    kwargs = network_kwargs(cfg.model.network, OmegaConf.to_container(cfg.model.net), dm.shape, dm.num_classes)
    net = EDMPrecond(build_network(cfg.model.network, **kwargs))
    n_params = sum(p.numel() for p in net.parameters())
    modules = {source: EDMModule(copy.deepcopy(net), EDMLoss(), sample_shape=dm.shape, num_classes=0,
                                 global_batch=args.batch, seed=0, optim=OmegaConf.to_object(cfg.optim),
                                 ema=OmegaConf.to_object(cfg.ema),
                                 entropic=EntropicConfig(update_every_steps=10**9, source=source))
               for source in ("train_loss", "ema_eval")}
    module = modules["train_loss"]
    fraction = EntropicConfig().eval_fraction
    dm.stream_from(0)
    plain_loader = dm.train_dataloader()

    plain, light, light_ema = [], [], []
    for _ in range(args.repeats):
        plain.append(statistics.median(plain_loop(net, plain_loader, args.steps, args.batch, cfg.optim.lr)[args.warmup:]))
        light.append(statistics.median(lightning_loop(module, dm, args.steps)[args.warmup:]))
        light_ema.append(statistics.median(lightning_loop(modules["ema_eval"], dm, args.steps)[args.warmup:]))
    t_plain, t_light, t_light_ema = statistics.median(plain), statistics.median(light), statistics.median(light_ema)
    ratios = [b / a for a, b in zip(light, light_ema)]

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
    print(f"| {'EDMModule + Trainer, train_loss':<34} | {t_light * 1e3:8.2f} | {args.batch / t_light:8.0f} | "
          f"{(t_light / t_plain - 1) * 100:+8.1f}% |")
    print(f"| {'EDMModule, source=ema_eval':<34} | {t_light_ema * 1e3:8.2f} | {args.batch / t_light_ema:8.0f} | "
          f"{(t_light_ema / t_plain - 1) * 100:+8.1f}% |")
    print(f"| {'tracker.update alone':<34} | {t_tracker * 1e3:8.3f} | {'':>8} | "
          f"{t_tracker / t_light * 100:7.2f}%* |")
    print("* share of the EDMModule step time (target <= 1%); Lightning overhead target <= 5%")
    print(f"EMA pass (entropic.source=ema_eval, eval_fraction {fraction:g}): module step ema_eval / train_loss = "
          f"{statistics.median(ratios):.3f} (median of the per-repeat ratios {' '.join(f'{r:.3f}' for r in ratios)}; "
          "target <= 1.05)")
    print("per-repeat ms/step plain:", " ".join(f"{t * 1e3:.1f}" for t in plain))
    print("per-repeat ms/step module:", " ".join(f"{t * 1e3:.1f}" for t in light))
    print("per-repeat ms/step module ema_eval:", " ".join(f"{t * 1e3:.1f}" for t in light_ema))

    for name, batch, shape, cfg_net in (
        ("digits U-Net", args.batch, tuple(dm.shape), cfg),
        ("CIFAR-10 DDPM++ (configs/cifar10.yaml)", args.cifar_batch, (3, 32, 32),
         load_config(REPO / "configs" / "cifar10.yaml") if args.cifar_batch else None),
    ):
        if cfg_net is None:
            continue
        kw = network_kwargs(cfg_net.model.network, OmegaConf.to_container(cfg_net.model.net), shape, 0)
        big = EDMPrecond(build_network(cfg_net.model.network, **kw))
        steps = args.steps if batch == args.batch else args.cifar_steps
        t_step, t_pass = ema_pass_share(big, shape, batch, fraction, steps, warmup=2)
        print(f"{name} ({sum(p.numel() for p in big.parameters()) / 1e6:.1f}M params, dropout "
              f"{cfg_net.model.net.get('dropout', 0.0)}), batch {batch}, {steps} steps: "
              f"plain step {t_step * 1e3:.1f} ms, "
              f"EMA pass on {max(1, round(fraction * batch))} samples {t_pass * 1e3:.1f} ms = "
              f"{t_pass / t_step * 100:.1f}% of the step")


if __name__ == "__main__":
    main()
