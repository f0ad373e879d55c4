"""Forward + backward time of our U-Nets against NVlabs edm's own, on the same weights.

Needs a local checkout of github.com/NVlabs/edm (its code is not part of this repository, licence
CC BY-NC-SA): `--edm-repo /path/to/edm`. For each architecture at CIFAR-10 size (DDPM++ and NCSN++ as edm's
config F, an ADM of CIFAR size), edm's network is built with random weights, pickled as edm's training loop
does, and read back by `evodiff_pl.io.nvlabs` (so both hold the same weights); the script reports how far apart
their backbone outputs F are, then times one EDM-loss training step (forward + backward, train mode, float32) of
each, interleaved (ours, theirs, ours, ...), and reports medians and the ratio ours / NVlabs.

    OMP_NUM_THREADS=1 python benchmarks/nvlabs_networks.py --edm-repo /tmp/edm --batch 2 --reps 9
"""

from __future__ import annotations

import argparse
import copy
import pickle
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from evodiff_pl.io.nvlabs import build_from_record, read_nvlabs_pickle  # noqa: E402

ARCHS = {
    "ddpmpp (config F)": dict(model_type="SongUNet", embedding_type="positional", encoder_type="standard",
                              decoder_type="standard", channel_mult_noise=1, resample_filter=[1, 1],
                              model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13),
    "ncsnpp (config F)": dict(model_type="SongUNet", embedding_type="fourier", encoder_type="residual",
                              decoder_type="standard", channel_mult_noise=2, resample_filter=[1, 3, 3, 1],
                              model_channels=128, channel_mult=[2, 2, 2], augment_dim=9, dropout=0.13),
    "adm (CIFAR size)": dict(model_type="DhariwalUNet", model_channels=128, channel_mult=[1, 2, 2], num_blocks=3,
                             attn_resolutions=[16, 8], dropout=0.13),
}


def edm_network(edm_repo: str, kwargs: dict) -> torch.nn.Module:
    sys.path.insert(0, edm_repo)
    import dnnlib  # noqa: PLC0415 (NVlabs' package, from --edm-repo)

    torch.manual_seed(0)
    net = dnnlib.util.construct_class_by_name(class_name="training.networks.EDMPrecond", img_resolution=32,
                                              img_channels=3, label_dim=0, **kwargs)
    with torch.no_grad():  # no zero-initialised layer: the output comparison sees every weight
        for p in net.parameters():
            p.copy_(0.02 * torch.randn_like(p))
    return net


def ours_from(net: torch.nn.Module) -> torch.nn.Module:
    """Our denoiser holding `net`'s weights, through an edm-style snapshot pickle."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "network-snapshot.pkl"
        with open(path, "wb") as f:
            pickle.dump({"ema": copy.deepcopy(net).eval().requires_grad_(False)}, f)
        ours, _ = build_from_record(read_nvlabs_pickle(path)["ema"])
    return ours


def train_step(net: torch.nn.Module, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> float:
    start = time.perf_counter()
    d = net(x0 + sigma.reshape(-1, 1, 1, 1) * noise, sigma)
    ((sigma**2 + 0.25) / (0.5 * sigma) ** 2 * (d - x0).square().mean(dim=(1, 2, 3))).sum().backward()
    for p in net.parameters():
        p.grad = None
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edm-repo", required=True, help="path of a local NVlabs edm checkout (not shipped here)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--archs", default=",".join(ARCHS), help="comma-separated subset of " + ", ".join(ARCHS))
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), batch {args.batch}x3x32x32, float32, "
          f"CPU, median of {args.reps} interleaved steps after 1 warm-up each")
    print("| network | parameters | ours ms | NVlabs ms | ours / NVlabs | max rel. diff of F |")
    print("|---|---|---|---|---|---|")
    for name in args.archs.split(","):
        theirs = edm_network(args.edm_repo, ARCHS[name])
        ours = ours_from(theirs)
        g = torch.Generator().manual_seed(1)
        x0 = torch.rand(args.batch, 3, 32, 32, generator=g) * 2 - 1
        sigma = (torch.randn(args.batch, generator=g) * 1.2 - 1.2).exp()
        noise = torch.randn(x0.shape, generator=g)
        with torch.no_grad():  # F itself: D is dominated by c_skip·x at moderate σ
            c_noise = sigma.log() / 4
            a, b = ours.eval().backbone(x0 + noise, c_noise), theirs.eval().model(x0 + noise, c_noise, None)
        rel = float((a - b).abs().max() / b.abs().max())
        ours.train().requires_grad_(True)
        theirs.train().requires_grad_(True)
        times: dict[str, list[float]] = {"ours": [], "nvlabs": []}
        pair = [("ours", ours), ("nvlabs", theirs)]
        for rep in range(args.reps + 1):
            for key, net in pair if rep % 2 == 0 else pair[::-1]:
                t = train_step(net, x0, sigma, noise)
                if rep > 0:
                    times[key].append(t)
        m_ours, m_theirs = statistics.median(times["ours"]), statistics.median(times["nvlabs"])
        n_params = sum(p.numel() for p in ours.parameters())
        print(f"| {name} | {n_params / 1e6:.2f}M | {1e3 * m_ours:.0f} | {1e3 * m_theirs:.0f} | "
              f"{m_ours / m_theirs:.3f} | {rel:.1e} |", flush=True)


if __name__ == "__main__":
    main()
