"""Cost of one validation evaluation (one spec, its sample grid included) against the number of samples.

Runs `SampleQualityCallback` inside `Trainer.validate` on the digits data (1x8x8) with a small SongUNet
under EDMPrecond (untrained: the cost does not depend on the weights) and reports wall time, the time
spent inside the denoiser, the rest as overhead (generation bookkeeping, uint8 quantisation, feature
sums, the Fréchet distance, the grid PNG), and the peak memory of the evaluation (CUDA: peak allocated;
CPU: peak RSS over the evaluation, reset through /proc/self/clear_refs, minus the RSS at its start).

    PYTHONPATH=. python benchmarks/validation_cost.py [--num-samples 1000 2000 4000] [--spec evodiff/logsnr/10]
"""

from __future__ import annotations

import argparse
import re
import tempfile
import time
from pathlib import Path

import lightning as L
import torch
from torch import Tensor, nn

from evodiff_pl.data.datasets import DigitsDataModule
from evodiff_pl.evaluation.callback import SampleQualityCallback
from evodiff_pl.networks import build_network
from evodiff_pl.networks.precond import EDMPrecond
from evodiff_pl.training.datamodule import as_lightning


class TimedDenoiser(nn.Module):
    """Accumulates the wall time spent inside the wrapped denoiser (synchronising CUDA)."""

    def __init__(self, denoiser: nn.Module) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.seconds = 0.0
        self.calls = 0

    def forward(self, x: Tensor, sigma: Tensor, labels: Tensor | None = None) -> Tensor:
        sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        out = self.denoiser(x, sigma, labels)
        sync()
        self.seconds += time.perf_counter() - start
        self.calls += 1
        return out


class BenchModule(L.LightningModule):
    """The attributes the callback reads, around an untrained digits-sized EDM denoiser."""

    def __init__(self, model_channels: int) -> None:
        super().__init__()
        net = build_network("songunet", img_resolution=8, in_channels=1, out_channels=1, model_channels=model_channels,
                            channel_mult=(1, 2), num_blocks=1, attn_resolutions=(), dropout=0.0)
        self.ema = TimedDenoiser(EDMPrecond(net))
        self.entropic_schedule = None
        self.sample_shape = (1, 8, 8)
        self.num_classes = 0
        self.sigma_min, self.sigma_max = 0.002, 80.0
        self.images_seen = 0

    def validation_step(self, batch, batch_idx):
        return None


def _rss_bytes(field: str) -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.M).group(1)) * 1024


class TimedCallback(SampleQualityCallback):
    """Measures `on_validation_epoch_end` (the evaluation) alone."""

    result: dict[str, float] = {}

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cuda = pl_module.device.type == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
        else:
            Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
            base = _rss_bytes("VmRSS")
        pl_module.ema.seconds, pl_module.ema.calls = 0.0, 0
        start = time.perf_counter()
        super().on_validation_epoch_end(trainer, pl_module)
        wall = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() if cuda else _rss_bytes("VmHWM")
        TimedCallback.result = {"wall": wall, "denoiser": pl_module.ema.seconds, "calls": pl_module.ema.calls,
                                "peak_mb": (peak - base) / 2**20}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-samples", type=int, nargs="+", default=[1000, 2000, 4000])
    parser.add_argument("--spec", default="evodiff/logsnr/10", help="solver/schedule/nfe")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--grid-size", type=int, default=64)
    parser.add_argument("--model-channels", type=int, default=16)
    parser.add_argument("--accelerator", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    dm = DigitsDataModule(batch_size=64)
    module = BenchModule(args.model_channels)
    params = sum(p.numel() for p in module.parameters())
    with torch.no_grad():  # warm-up: the first call of a fresh process is not representative
        module.ema(torch.randn(args.batch_size, 1, 8, 8), torch.ones(args.batch_size))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.num_samples:
            cb = TimedCallback([args.spec], num_samples=n, stats_dir=tmp, batch_size=args.batch_size,
                               grid_size=args.grid_size, out_dir=tmp)
            trainer = L.Trainer(accelerator=args.accelerator, devices=1, logger=False, enable_checkpointing=False,
                                enable_progress_bar=False, enable_model_summary=False, callbacks=[cb],
                                default_root_dir=tmp)
            (score,) = trainer.validate(module, datamodule=as_lightning(dm), verbose=False)[0].values()
            r = TimedCallback.result
            rows.append((n, r["wall"], r["denoiser"], 100 * (1 - r["denoiser"] / r["wall"]), r["peak_mb"],
                         n / r["wall"], r["calls"], score))
    device = trainer.strategy.root_device
    print(f"\nspec {args.spec}, SongUNet {params / 1e6:.2f}M params (1x8x8), batch {args.batch_size}, "
          f"grid {args.grid_size}, device {device}, torch threads {torch.get_num_threads()}")
    print(f"{'samples':>8} {'wall s':>8} {'denoiser s':>11} {'overhead %':>11} {'peak MB':>8} {'img/s':>8} "
          f"{'D calls':>8} {'fd_pixels':>10}")
    for row in rows:
        print(f"{row[0]:>8} {row[1]:>8.2f} {row[2]:>11.2f} {row[3]:>11.1f} {row[4]:>8.1f} {row[5]:>8.1f} "
              f"{row[6]:>8} {row[7]:>10.1f}")


if __name__ == "__main__":
    main()
