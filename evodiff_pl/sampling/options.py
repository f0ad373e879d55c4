"""sample.py's command line: the `SampleConfig` schema with its documented keys, parsing and value checks."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any, Dict, Optional

import torch
from omegaconf import OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException
from torch import Tensor

from evodiff_pl.config.keys import did_you_mean, field_docs, format_default, suggest

SCORES = {"none": None, "fd_pixels": "pixels", "fid_inception": "inception", "fd_dinov2": "dinov2",
          "kid_inception": "inception"}
"""score= values and their feature extractors (kid_*: Kernel Inception Distance, the others Fréchet distances)."""
FORMATS = ("auto", "png", "npz", "both", "none")
DEVICES = ("auto", "cpu", "cuda")
MAX_SCORED = 50_000
"""Default number of scored samples: one per reference sample, at most this many (FID-50k)."""


class SampleError(ValueError):
    """A sample.py argument is invalid or does not fit the checkpoint; the message names it."""


@dataclass
class SampleConfig:
    ckpt: Optional[str] = None
    """Required: a train.py run directory (its newest checkpoint), a .ckpt file or an NVlabs edm/edm2 network
    pickle (.pkl: edm-*.pkl, edm2-img*.pkl or network-snapshot-*.pkl; read without running its code), or the
    http(s) URL of a file (downloaded once to ~/.cache/evodiff-pl/downloads, or $EVODIFF_DOWNLOADS)."""
    ema: bool = True
    """Sample the EMA weights; false: the raw trained weights."""
    solver: str = "evodiff_consistent"
    """Solver, or a comma-separated list for a sweep: any of `evodiff_pl.solvers.SOLVERS` (euler, heun,
    dpmpp_2m, dpmpp_3m, evodiff, evodiff_consistent, unipc, ipndm, edm_stochastic, dpmpp_2m_sde)."""
    schedule: str = "rescaled_entropic"
    """Schedule, or a comma-separated list: karras, logsnr, entropic, rescaled_entropic (the learned ones use
    the schedule stored in the checkpoint, or schedule_file), head_entropic, head_rescaled_entropic (from the
    log-variance head of an EDM2 network), tuned (a grid tuned for each solver x NFE: read from
    <checkpoint stem>_schedule_tuned.json in outdir or beside the checkpoint, else from the checkpoint; the
    missing ones are tuned now and written there)."""
    nfe: str = "10"
    """Denoiser calls per sample, or a comma-separated list (heun makes 2 per step: even values only)."""
    class_label: Optional[int] = None
    """class=K: every sample of class K (conditional networks); default: each seed's own random class (drawn from
    the seed, so image j depends only on seed j)."""
    guidance: float = 1.0
    """Guidance weight w (1: none), as NVlabs edm2's generate_images.py: D = gnet + w·(net − gnet). With gnet:
    autoguidance (a conditional gnet with the same classes) or classifier-free guidance (an unconditional gnet);
    without: classifier-free guidance with the null label (conditional networks trained with label dropout)."""
    gnet: Optional[str] = None
    """The guiding network for guidance != 1: a run directory, .ckpt or NVlabs pickle of the same sample shape
    (its EMA weights)."""
    protocol: str = "default"
    """default, or edm: NVlabs edm's generate.py (final Euler step to sigma = 0 counted in nfe, float64 state
    around the float32 network, per-seed generators on the device): solver=heun schedule=karras nfe=35
    reproduces generate.py's images for the same seeds."""
    seeds: Optional[str] = None
    """Samples to make, e.g. 0-49999 or 0-7,100; image j uses seed j. Default: 0-63, or with a score one per
    reference sample (at most 50000)."""
    outdir: Optional[str] = None
    """Output folder; default <run dir>/samples."""
    format: str = "auto"
    """png, npz, both or none; auto: png for images, npz for vector data."""
    per_folder: int = 0
    """PNGs per subfolder (1000: <name>/000000/, <name>/001000/, ...); 0: all in <name>/."""
    batch: int = 256
    """Samples per denoiser call on each process (does not change any sample)."""
    device: str = "auto"
    """auto (cuda if available), cpu or cuda."""
    score: str = "none"
    """none, fd_pixels (Fréchet distance on pixels or raw vectors), fid_inception (FID), fd_dinov2 (FD-DINOv2, as
    edm2) or kid_inception (KID: reference features from data=/the checkpoint's dataset or a KID stats file)."""
    stats: Optional[str] = None
    """Reference statistics file written by FrechetScore.prepare_real; default: the cached statistics of the
    checkpoint's dataset (computed and cached on first use)."""
    data: Optional[Dict[str, Any]] = None
    """The dataset, as train.py's data section (data.name=cifar10 data.root=... data.download=false), for a
    checkpoint that stores none (an NVlabs pickle): needed by estimate_schedule and by a score without stats."""
    stats_dir: Optional[str] = None
    """Cache of reference statistics; default $EVODIFF_STATS or ~/.cache/evodiff-pl/stats."""
    vae: Optional[str] = None
    """Latent EDM2 pickles (edm2-img512-*): local folder of the Stable Diffusion VAE that decodes the samples
    (a diffusers AutoencoderKL, e.g. a copy of stabilityai/sd-vae-ft-mse); needs the diffusers package."""
    inception_weights: Optional[str] = None
    """Local InceptionV3 weights for fid_inception and kid_inception (needed offline); default: download once."""
    dinov2_weights: Optional[str] = None
    """Local DINOv2 ViT-L/14 weights (dinov2_vitl14_pretrain.pth) for fd_dinov2 (needed offline; the model code
    comes from torch.hub's cache); default: download once."""
    schedule_file: Optional[str] = None
    """Learned schedule JSON (schedule.json, or one written by estimate_schedule) instead of the stored one."""
    estimate_schedule: bool = False
    """Instead of sampling, run the dedicated entropic-time estimation pass and write
    <checkpoint stem>_schedule_estimated.json into outdir if given, else beside the checkpoint."""
    levels: int = 128
    """Estimation pass: noise levels K on the Karras grid."""
    pairs: int = 1024
    """Estimation pass: (training image, noise) pairs M per level."""
    tune: bool = False
    """Re-tune the grids of schedule=tuned (warm-started from the stored ones) instead of reading them."""
    tune_samples: int = 256
    """Tuning: starting noises (seeds 2^31 + j, never scored)."""
    tune_evals: int = 100
    """Tuning: at most this many solver runs per solver x NFE."""
    tune_objective: str = "fd"
    """Tuning objective (`evodiff_pl.tuning`, docs/method.md §2.7): fd (to the reference solution's endpoints),
    rmse, slack, or fd_data (the score= itself on the tuning noises, against its reference statistics)."""
    progress: bool = True
    """Show progress bars (images/s)."""


ALIASES = {"class": "class_label"}
"""Command-line names of the fields whose name is a Python keyword."""


def usage() -> str:
    """The CLI reference: every key with its default and meaning."""
    docs = field_docs(SampleConfig)
    cli_names = {v: k for k, v in ALIASES.items()}
    lines = ["usage: python sample.py ckpt=RUN_DIR_OR_FILE [key=value ...]", ""]
    for f in fields(SampleConfig):
        lines.append(f"  {cli_names.get(f.name, f.name)}={format_default(f.default)}")
        lines += [f"      {line}" for line in docs[f.name].splitlines()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str]) -> SampleConfig:
    """`key=value` arguments over the `SampleConfig` defaults; SampleError names an unknown key or a bad value."""
    bad = [a for a in argv if "=" not in a]
    if bad:
        raise SampleError(f"arguments must look like key=value (e.g. nfe=10), got {bad[0]!r}")
    argv = [ALIASES.get(key, key) + "=" + value for key, _, value in (a.partition("=") for a in argv)]
    try:
        cfg = OmegaConf.merge(OmegaConf.structured(SampleConfig), OmegaConf.from_dotlist(list(argv)))
    except ConfigKeyError as err:
        raise SampleError(f"unknown key {err.key}{suggest(str(err.key), [f.name for f in fields(SampleConfig)])}"
                          ) from None
    except OmegaConfBaseException as err:
        raise SampleError(f"invalid value for {err.full_key or err.key}: {str(err).splitlines()[0]}") from None
    return OmegaConf.to_object(cfg)


def parse_seeds(text: str) -> Tensor:
    """'0-7,12,20-23' -> int64 tensor in the given order; SampleError for bad syntax, negative or repeated seeds."""
    seeds: list[int] = []
    for part in text.split(","):
        lo, sep, hi = part.strip().partition("-")
        if not lo.isdigit() or (sep and not hi.isdigit()) or (sep and int(hi) < int(lo)):
            raise SampleError(f"seeds={text!r}: expected ranges and numbers >= 0 like 0-49999 or 0-7,12, got {part!r}")
        seeds.extend(range(int(lo), int(hi if sep else lo) + 1))
    if len(set(seeds)) != len(seeds):
        raise SampleError(f"seeds={text!r} names some seeds twice")
    return torch.tensor(seeds, dtype=torch.int64)


def check_choice(key: str, value: str, valid: Sequence[str]) -> None:
    """SampleError naming `key`, the valid values and the closest one, unless `value` is valid."""
    if value not in valid:
        raise SampleError(f"{key}={value!r} is not one of {', '.join(valid)}{did_you_mean(value, sorted(valid))}")


def names(key: str, text: str, valid: Sequence[str]) -> list[str]:
    names = list(dict.fromkeys(s.strip() for s in text.split(",")))
    for name in names:
        check_choice(key, name, valid)
    return names


def nfes(text: str) -> list[int]:
    items = list(dict.fromkeys(s.strip() for s in text.split(",")))
    if not all(s.isdigit() and int(s) > 0 for s in items):
        raise SampleError(f"nfe={text!r}: expected positive integers, e.g. nfe=10 or nfe=5,10,20")
    return [int(s) for s in items]
