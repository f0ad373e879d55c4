"""GPU check: training and sampling throughput of the CIFAR-10 config-F network, and the cost of an FID evaluation.

Prints one table (and writes it as JSON with --out):

1. Training img/s and peak memory of one EDM step on the config-F DDPM++ U-Net (configs/cifar10.yaml),
   float32 and bf16-mixed, eager and torch.compile, for three loops over the same synthetic data:
   `lightning` = our EDMModule under a Lightning Trainer (default step, and `perf.sync_free_step`),
   `plain` = a plain PyTorch loop of the same step (seeded σ and noise, loss, backward, all-reduced
   non-finite check, Adam, EMA, tracker update), `edm` = the step as EDM's training loop does it (σ and
   noise from the global RNG, loss, backward, NaN-to-zero on the gradients, Adam, EMA; no skip, no tracker).
   Target: lightning within 5 % of plain.
2. Sampling img/s per solver at NFE 10 (Karras grid, EMA network in eval mode, float32).
3. One Inception FID evaluation of N generated samples (default 10k) as the validation callback runs it:
   time in the denoiser, time in Inception, and the rest (quantisation, feature sums, Fréchet distance).
   Target: the rest ≤ 10 % of the whole. Without --inception-weights the Inception network has random
   weights (the cost is the same, the score is meaningless); the output says so.

    python benchmarks/gpu_check.py                       # on a GPU, ~5-8 min (bash benchmarks/gpu_check.sh)
    python benchmarks/gpu_check.py --device cpu --quick  # a small network and few samples: checks the script
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import tempfile
import time
import warnings
from pathlib import Path
from unittest import mock

import lightning as L
import torch
from omegaconf import OmegaConf
from torch import Tensor, nn
from torch.utils.data import DataLoader, IterableDataset

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from evodiff_pl.config.schema import PerfConfig, load_config  # noqa: E402
from evodiff_pl.training.ema import ema_beta, update_ema  # noqa: E402
from evodiff_pl.schedules.tracker import SigmaBinnedLoss  # noqa: E402
from evodiff_pl.sampling.generate import EvalSpec, generate  # noqa: E402
from evodiff_pl.evaluation.metrics import FrechetScore, InceptionFeatures  # noqa: E402
from evodiff_pl.training.module import EDMModule  # noqa: E402
from evodiff_pl.networks import build_network  # noqa: E402
from evodiff_pl.networks.precond import EDMPrecond  # noqa: E402
from evodiff_pl.training.losses import EDMLoss  # noqa: E402
from evodiff_pl.utils.seeding import derive_seed  # noqa: E402
from evodiff_pl.solvers import SOLVERS  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
SHAPE = (3, 32, 32)
QUICK_NET = {"model_channels": 16, "channel_mult": [1, 1], "num_blocks": 1, "attn_resolutions": [16]}


class RandomImages(IterableDataset):
    """An endless stream of fixed random images in [-1, 1] (the cost of a step does not depend on the pixels)."""

    def __init__(self, n: int = 1024) -> None:
        self.x = torch.rand(n, *SHAPE, generator=torch.Generator().manual_seed(0)) * 2 - 1

    def __iter__(self):
        i = 0
        while True:
            yield self.x[i % len(self.x)], 0
            i += 1


def loader(batch: int, device: torch.device) -> DataLoader:
    return DataLoader(RandomImages(), batch_size=batch, pin_memory=device.type == "cuda")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def network(net_kwargs: dict, seed: int = 0) -> EDMPrecond:
    torch.manual_seed(seed)
    return EDMPrecond(build_network("songunet", img_resolution=32, in_channels=3, out_channels=3, **net_kwargs))


def plain_step_loop(net: EDMPrecond, data: DataLoader, steps: int, warmup: int, device: torch.device,
                    bf16: bool, compile_: bool) -> float:
    """Our step without Lightning: seeded σ and noise, loss, backward, reduced non-finite check, Adam, EMA, tracker."""
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if compile_:
        net.compile()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn, tracker = EDMLoss(), SigmaBinnedLoss(0.002, 80.0)
    it, images, start = iter(data), 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        x0 = next(it)[0].to(device, non_blocking=True)
        g = torch.Generator(device=device).manual_seed(derive_seed(0, step))
        sigma = loss_fn.sample_sigma(len(x0), device=device, generator=g)
        noise = torch.randn(x0.shape, generator=g, device=device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            out = loss_fn(net, x0, sigma=sigma, noise=noise)
        out.loss.mean().backward()
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in net.parameters()], error_if_nonfinite=False)
        bad, _ = torch.stack([(~out.loss.detach().isfinite()).sum().double(), grad_norm.double()]).tolist()
        if not bad:
            opt.step()
            update_ema(ema, net, ema_beta(images, len(x0), 500_000, 0.05))
            tracker.update(out.sigma, out.mse, out.weight)
        opt.zero_grad(set_to_none=True)
        images += len(x0)
    sync(device)
    return steps * data.batch_size / (time.perf_counter() - start)


def edm_step_loop(net: EDMPrecond, data: DataLoader, steps: int, warmup: int, device: torch.device,
                  bf16: bool, compile_: bool) -> float:
    """The step as EDM's training loop takes it: global-RNG σ and noise, loss, backward, gradients with NaN/Inf
    replaced, Adam, EMA; no skip decision and no tracker (nothing waits for the device)."""
    net = net.to(device)
    ema = copy.deepcopy(net).requires_grad_(False).eval()
    if compile_:
        net.compile()
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    loss_fn = EDMLoss()
    it, images, start = iter(data), 0, 0.0
    for step in range(warmup + steps):
        if step == warmup:
            sync(device)
            start = time.perf_counter()
        x0 = next(it)[0].to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(net, x0).loss
        loss.sum().mul(1 / len(x0)).backward()
        for p in net.parameters():
            torch.nan_to_num(p.grad, nan=0, posinf=1e5, neginf=-1e5, out=p.grad)
        opt.step()
        opt.zero_grad(set_to_none=True)
        update_ema(ema, net, ema_beta(images, len(x0), 500_000, 0.05))
        images += len(x0)
    sync(device)
    return steps * data.batch_size / (time.perf_counter() - start)


class StepClock(L.Callback):
    """Wall time from the start of batch `warmup` to the end of training (the device synchronised at both ends)."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.seconds = warmup, 0.0, float("nan")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:
        if batch_idx == self.warmup:
            sync(pl_module.device)
            self.start = time.perf_counter()

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        sync(pl_module.device)
        self.seconds = time.perf_counter() - self.start


def lightning_loop(net: EDMPrecond, data: DataLoader, steps: int, warmup: int, device: torch.device,
                   bf16: bool, compile_: bool, sync_free: bool = False) -> float:
    """EDMModule.training_step under a Trainer, as train.py runs it (no logger, checkpoint or evaluation)."""
    module = EDMModule(net, EDMLoss(), sample_shape=SHAPE, num_classes=0, global_batch=data.batch_size, seed=0,
                       perf=PerfConfig(compile=compile_, sync_free_step=sync_free))
    clock = StepClock(warmup)
    trainer = L.Trainer(accelerator=device.type, devices=1, precision="bf16-mixed" if bf16 else "32-true",
                        max_steps=warmup + steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                        use_distributed_sampler=False, callbacks=[clock], log_every_n_steps=100)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, train_dataloaders=data)
    return steps * data.batch_size / clock.seconds


class Timed(nn.Module):
    """Accumulates the wall time spent inside the wrapped module (the device synchronised around each call)."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner, self.seconds = inner, 0.0
        for name in ("num_features", "feature_name"):
            if hasattr(inner, name):
                setattr(self, name, getattr(inner, name))

    def forward(self, *args, **kwargs):
        device = args[0].device
        sync(device)
        start = time.perf_counter()
        out = self.inner(*args, **kwargs)
        sync(device)
        self.seconds += time.perf_counter() - start
        return out


def random_inception(path: Path) -> Path:
    """torch-fidelity's InceptionV3 with random weights written to `path` (no download)."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None):
        net = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.save(net.state_dict(), path)
    return path


class RandomReal:
    """Reference data for the statistics: random uint8 images (their cost is cached in training, not timed here)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def stats_key(self) -> str:
        return f"gpu-check-random-{self.n}"

    def real_images(self, max_n: int | None = None) -> Tensor:
        g = torch.Generator().manual_seed(1)
        return torch.randint(0, 256, (min(self.n, max_n or self.n), *SHAPE), dtype=torch.uint8, generator=g)


def fid_cost(ema: EDMPrecond, n: int, batch: int, device: torch.device, weights: Path | None, tmp: Path) -> dict:
    """One FID evaluation of n samples (evodiff, Karras, NFE 10) split into denoiser, Inception and the rest."""
    weights = weights or random_inception(tmp / "inception-random.pth")
    denoiser, extractor = Timed(ema), Timed(InceptionFeatures(weights))
    score = FrechetScore(extractor, num_samples=n, shape=SHAPE, stats_dir=tmp).to(device)
    score.prepare_real(RandomReal(min(n, 2000)))
    sigmas = EvalSpec.parse("evodiff/karras/10").sigmas(0.002, 80.0)
    extractor.seconds = 0.0
    sync(device)
    start = time.perf_counter()
    for chunk in torch.arange(n).split(batch):
        x = generate(denoiser, chunk, SHAPE, solver="evodiff", sigmas=sigmas, seed=0, batch_size=batch, device=device)
        score.update(x)
    value = score.compute()
    sync(device)
    total = time.perf_counter() - start
    rest = total - denoiser.seconds - extractor.seconds
    return {"samples": n, "total_s": total, "denoiser_s": denoiser.seconds, "inception_s": extractor.seconds,
            "rest_s": rest, "rest_share": rest / total, "fid": value}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--quick", action="store_true", help="a 2-level 16-channel U-Net, few steps and samples")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default 64; quick: 8)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run (default 30; quick: 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per run (default 10; quick: 1)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--fid-samples", type=int, default=None, help="samples of the FID evaluation (default 10000)")
    parser.add_argument("--inception-weights", type=Path, default=None,
                        help="weights-inception-2015-12-05-6726825d.pth; default: random weights (cost only)")
    parser.add_argument("--out", type=Path, default=None, help="also write the results as JSON here")
    args = parser.parse_args()
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but torch sees no CUDA device; use --device cpu --quick for a dry run")
    quick = args.quick
    batch = args.batch or (8 if quick else 64)
    steps = args.steps or (2 if quick else 30)
    warmup = args.warmup or (1 if quick else 10)
    fid_n = args.fid_samples or (32 if quick else 10_000)
    net_kwargs = QUICK_NET if quick else OmegaConf.to_container(load_config(ROOT / "configs" / "cifar10.yaml").model.net)
    results: dict = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                     "torch": torch.__version__, "network": net_kwargs, "batch": batch, "training": [],
                     "sampling": [], "fid": None}
    n_params = sum(p.numel() for p in network(net_kwargs).parameters())
    print(f"# {results['device']}, torch {torch.__version__}, SongUNet {n_params / 1e6:.1f}M parameters, batch {batch}, "
          f"{steps} timed + {warmup} warm-up steps per run", flush=True)
    print(f"{'loop':<22} {'precision':<9} {'compile':<7} {'img/s':>9} {'peak GiB':>9}", flush=True)
    loops = {"lightning": lightning_loop, "lightning sync_free": lambda *a: lightning_loop(*a, sync_free=True),
             "plain": plain_step_loop, "edm": edm_step_loop}
    for compile_ in (False,) if args.no_compile else (False, True):
        for bf16 in (False, True):
            for name, loop in loops.items():
                reset_peak(device)
                rate = loop(network(net_kwargs), loader(batch, device), steps, warmup, device, bf16, compile_)
                row = {"loop": name, "precision": "bf16" if bf16 else "fp32", "compile": compile_, "img_per_s": rate,
                       "peak_gib": peak_gib(device)}
                results["training"].append(row)
                print(f"{name:<22} {row['precision']:<9} {str(compile_).lower():<7} {rate:>9.1f} "
                      f"{row['peak_gib']:>9.2f}", flush=True)
            by = {r["loop"]: r["img_per_s"] for r in results["training"]
                  if r["compile"] == compile_ and r["precision"] == ("bf16" if bf16 else "fp32")}
            print(f"  lightning vs plain: {by['lightning'] / by['plain'] - 1:+.1%} (target >= -5 %), "
                  f"sync_free vs plain: {by['lightning sync_free'] / by['plain'] - 1:+.1%}", flush=True)
        if not compile_:
            ema = network(net_kwargs).to(device).eval().requires_grad_(False)
            n_sample = 64 if quick else 2000
            print(f"\n{'solver (karras, NFE 10)':<24} {'img/s':>9}   ({n_sample} samples, batch 500, fp32)", flush=True)
            for solver in SOLVERS:
                sigmas = EvalSpec.parse(f"{solver}/karras/10").sigmas(0.002, 80.0)
                generate(ema, torch.arange(min(n_sample, 500)), SHAPE, solver=solver, sigmas=sigmas, seed=0,
                         batch_size=500, device=device)  # warm-up
                sync(device)
                start = time.perf_counter()
                generate(ema, torch.arange(n_sample), SHAPE, solver=solver, sigmas=sigmas, seed=0, batch_size=500,
                         device=device)
                sync(device)
                rate = n_sample / (time.perf_counter() - start)
                results["sampling"].append({"solver": solver, "nfe": 10, "img_per_s": rate})
                print(f"{solver:<24} {rate:>9.1f}", flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                fid = fid_cost(ema, fid_n, 500, device, args.inception_weights, Path(tmp))
            fid["inception_weights"] = str(args.inception_weights) if args.inception_weights else "random"
            results["fid"] = fid
            which = ("the given weights" if args.inception_weights else
                     "RANDOM Inception weights (no --inception-weights): the cost is real, the score is not")
            print(f"\nFID evaluation, {fid_n} samples (evodiff/karras/10), {which}:\n"
                  f"  total {fid['total_s']:.1f} s = denoiser {fid['denoiser_s']:.1f} s + Inception "
                  f"{fid['inception_s']:.1f} s + rest {fid['rest_s']:.2f} s; rest {fid['rest_share']:.1%} of the "
                  f"total (target <= 10 %; it includes one Fréchet distance of 2048-d statistics, a fixed cost "
                  f"that dominates small --quick runs)\n", flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    if not math.isfinite(results["fid"]["fid"]):
        print("warning: the FID value is not finite", flush=True)


if __name__ == "__main__":
    main()
